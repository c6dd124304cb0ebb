"""Start `modeld gateway` as a subprocess in a test, as an operator would.

    async with running_gateway(daemon.addr, config) as gw:
        client = openai.AsyncOpenAI(base_url=gw.base_url, api_key="-")

The gateway's JSON log lines are drained into `gw.log`; it counts as started once it
logged `gateway_listening` (racing its exit, with a deadline).
"""

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from backend_proc import free_port
from cli_proc import cli_env

START_LIMIT_S = 20.0


class GatewayProc:
    def __init__(self, proc: asyncio.subprocess.Process, listen: str) -> None:
        self.proc = proc
        self.listen = listen
        self.log: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._changed = asyncio.Condition()
        self._pump = asyncio.create_task(self._drain())

    @property
    def base_url(self) -> str:
        return f"http://{self.listen}/v1"

    async def _drain(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.raw.append(line)
            with contextlib.suppress(ValueError):
                self.log.append(json.loads(line))
            async with self._changed:
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    async def wait_event(
        self, event: str, limit_s: float = START_LIMIT_S, since: int = 0
    ) -> dict[str, Any]:
        """The first `event` logged at or after `self.log[since]`."""

        async def seen() -> dict[str, Any]:
            async with self._changed:
                while True:
                    hit = next((e for e in self.log[since:] if e.get("event") == event), None)
                    if hit is not None:
                        return hit
                    if self._pump.done():
                        tail = "\n".join(self.raw[-20:])
                        raise AssertionError(f"the gateway exited before {event!r}:\n{tail}")
                    await self._changed.wait()

        return await asyncio.wait_for(seen(), limit_s)

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.terminate()
        try:
            return await asyncio.wait_for(self.proc.wait(), START_LIMIT_S)
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            await self._pump


@contextlib.asynccontextmanager
async def running_gateway(
    daemon_addr: str, config: Path, env: Mapping[str, str] | None = None
) -> AsyncIterator[GatewayProc]:
    """A serving gateway for the daemon at `daemon_addr`; SIGTERM at the end, exit 0."""
    listen = f"127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "modeld.cli.main", "gateway", "--config", str(config),
        "--addr", daemon_addr, "--listen", listen,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env=cli_env(env),
    )  # fmt: skip
    gateway = GatewayProc(proc, listen)
    try:
        await gateway.wait_event("gateway_listening")
        yield gateway
        assert await gateway.stop() == 0, "\n".join(gateway.raw[-20:])
    finally:
        await gateway.stop()
