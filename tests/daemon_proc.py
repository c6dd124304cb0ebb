"""Start the real daemon (`modeld serve`) as a subprocess in a test.

    async with running_daemon(tmp_path, extra_toml) as d:
        reply = await d.stub.ListModels(pb.ListModelsRequest())

The config is written to a file under tmp_path; the daemon's JSON log lines are
drained continuously into `d.log` (parsed dicts), and readiness is awaited on
the standard gRPC health check with a deadline.
"""

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from backend_proc import free_port
from modeld._proto.modeld.v1 import modeld_pb2_grpc

# The demo backend and model most end-to-end tests run; append to it for more.
ECHO_CATALOG = """
[backends.echo]
command = ["{python}", "-m", "modeld.backends.echo", "--addr", "{addr}"]
stop_grace = "2s"
[models.echo]
backend = "echo"
"""


def write_config(tmp_path: Path, body: str, port: int | None = None) -> tuple[Path, str]:
    port = port or free_port()
    addr = f"127.0.0.1:{port}"
    (tmp_path / "models").mkdir(exist_ok=True)
    text = (
        f'listen = ["{addr}"]\nstate_dir = "{tmp_path / "state"}"\n'
        f'models_dir = "{tmp_path / "models"}"\nlog_level = "debug"\nshutdown_grace = "5s"\n' + body
    )
    path = tmp_path / "modeld.toml"
    path.write_text(text)
    return path, addr


class DaemonProc:
    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        addr: str,
        config: Path,
        creds: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.proc = proc
        self.addr = addr
        self.config = config
        self.log: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._changed = asyncio.Condition()
        self._pump = asyncio.create_task(self._drain())
        self.channel = (
            grpc.aio.secure_channel(addr, creds) if creds else grpc.aio.insecure_channel(addr)
        )
        self.stub = modeld_pb2_grpc.ModelControlStub(self.channel)  # type: ignore[no-untyped-call]

    async def _drain(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.raw.append(line)
            with contextlib.suppress(ValueError):
                self.log.append(json.loads(line))
            async with self._changed:
                self._changed.notify_all()

    async def wait_log(
        self, match: Callable[[dict[str, Any]], bool], limit_s: float = 10.0
    ) -> dict[str, Any]:
        async def seen() -> dict[str, Any]:
            async with self._changed:
                while True:
                    hit = next((e for e in self.log if match(e)), None)
                    if hit is not None:
                        return hit
                    if self.proc.returncode is not None:
                        raise AssertionError(
                            "daemon exited; log tail:\n" + "\n".join(self.raw[-20:])
                        )
                    await self._changed.wait()

        return await asyncio.wait_for(seen(), limit_s)

    async def wait_serving(self, limit_s: float = 20.0) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)  # type: ignore[no-untyped-call]
        exited = asyncio.ensure_future(self.proc.wait())
        check = asyncio.ensure_future(
            health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=limit_s)
        )
        done, _ = await asyncio.wait({exited, check}, return_when=asyncio.FIRST_COMPLETED)
        if check not in done:
            check.cancel()
            raise AssertionError("daemon exited before serving:\n" + "\n".join(self.raw[-30:]))
        exited.cancel()
        assert check.result().status == health_pb2.HealthCheckResponse.SERVING

    async def stop(self, sig: int = signal.SIGTERM, limit_s: float = 20.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), limit_s)
        await self.close()
        return code

    async def close(self) -> None:
        await self.channel.close()
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await self._pump


async def start_daemon(
    config: Path,
    addr: str,
    *args: str,
    wait: bool = True,
    env: Mapping[str, str] | None = None,
    creds: grpc.ChannelCredentials | None = None,
) -> DaemonProc:
    """`env` adds variables (NOTIFY_SOCKET, ...) to the daemon's; `creds` makes `d.channel`
    a TLS channel, for a daemon with tls_cert."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MODELD_")}
    full_env = {**base, **(env or {})}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "modeld.cli.main",
        "serve",
        "--config",
        str(config),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=full_env,
    )
    daemon = DaemonProc(proc, addr, config, creds)
    if wait:
        try:
            await daemon.wait_serving()
        except BaseException:
            await daemon.close()
            raise
    return daemon


@contextlib.asynccontextmanager
async def running_daemon(
    tmp_path: Path, body: str = "", port: int | None = None
) -> AsyncIterator[DaemonProc]:
    config, addr = write_config(tmp_path, body, port)
    daemon = await start_daemon(config, addr)
    try:
        yield daemon
    finally:
        if daemon.proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await daemon.stop()
        await daemon.close()


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        stat = Path(f"/proc/{pid}/stat")
        with contextlib.suppress(OSError):
            if stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(pid)
    return alive


async def wait_pids_gone(pids: list[int], limit_s: float) -> list[int]:
    """Wait (on pidfds, not by polling) until every pid has exited; returns survivors."""
    loop = asyncio.get_running_loop()
    waits = []
    fds = []
    for pid in pids_alive(pids):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        fds.append(fd)
        done = loop.create_future()
        loop.add_reader(fd, lambda f=done: f.done() or f.set_result(None))
        waits.append(done)
    try:
        if waits:
            await asyncio.wait(waits, timeout=limit_s)
    finally:
        for fd in fds:
            loop.remove_reader(fd)
            os.close(fd)
    return pids_alive(pids)
