"""Run the `modeld` command as a subprocess, as a person would, without blocking the loop.

The environment is the test's own minus every MODELD_* variable, plus `env`.
"""

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

MODELD = (sys.executable, "-m", "modeld.cli.main")


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def cli_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MODELD_")}
    return {**base, **(env or {})}


async def modeld(*args: str, env: Mapping[str, str] | None = None, limit_s: float = 30) -> Result:
    return await run(*MODELD, *args, env=cli_env(env), limit_s=limit_s)


async def run(
    *argv: str, env: Mapping[str, str] | None = None, cwd: Path | None = None, limit_s: float = 30
) -> Result:
    """Run a command to its end with a deadline; it is killed if it overstays."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


@contextlib.asynccontextmanager
async def following(
    *args: str, env: Mapping[str, str] | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A verb that streams until interrupted (`logs -f`, `events`); SIGINT on the way out."""
    proc = await asyncio.create_subprocess_exec(
        *MODELD, *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(env),
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def read_line(
    proc: asyncio.subprocess.Process, limit_s: float = 10, stream: str = "stdout"
) -> str:
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    assert pipe is not None
    line = await asyncio.wait_for(pipe.readline(), limit_s)
    assert line, "the command ended without printing a line"
    return line.decode().rstrip("\n")
