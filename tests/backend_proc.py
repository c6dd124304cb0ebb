"""Start the demo backend as a real process in a test, and watch its output.

    async with running_backend("--load-delay", "0.2") as backend:
        reply = await backend.stub().Health(backend_pb2.HealthMessage())

Both output streams are drained all the time into `stdout` / `stderr` (lists of
lines), so a chatty backend never blocks on a full pipe, and `wait_line` waits
for a line with a deadline instead of sleeping. The backend runs in its own
process group, which `aclose` kills, grandchildren included.
"""

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from typing import Literal

import grpc

from modeld._proto.backend import backend_pb2_grpc

ECHO_MODULE = "modeld.backends.echo"
LISTENING_RE = (
    r"^echo_(?:backend|http) listening addr=(?P<host>.+):(?P<port>\d+) startup_ms=(?P<ms>[\d.]+)$"
)

Stream = Literal["stdout", "stderr"]


class LineNotSeen(AssertionError):
    """An awaited output line did not come before the deadline or the end of the stream."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def echo_argv(addr: str, *args: str, module: str = ECHO_MODULE) -> list[str]:
    """The command line that starts the demo backend (`module`) on `addr` with extra flags."""
    return [sys.executable, "-m", module, "--addr", addr, *args]


class BackendProc:
    """A running backend process with its output captured line by line."""

    def __init__(
        self, proc: asyncio.subprocess.Process, host: str, port: int, wait_limit_s: float = 10.0
    ) -> None:
        self.proc = proc
        # How long any wait below may take before it fails with the stderr tail.
        self.wait_limit_s = wait_limit_s
        self.host = host
        # The requested port; replaced by the bound one once the listening line is seen.
        self.port = port
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._closed: set[Stream] = set()
        self._changed = asyncio.Condition()
        self._pumps = [
            asyncio.create_task(self._pump("stdout", proc.stdout)),
            asyncio.create_task(self._pump("stderr", proc.stderr)),
        ]
        self._channel: grpc.aio.Channel | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    async def _pump(self, name: Stream, reader: asyncio.StreamReader | None) -> None:
        assert reader is not None
        lines = self.stdout if name == "stdout" else self.stderr
        async for raw in reader:
            lines.append(raw.decode(errors="replace").rstrip("\n"))
            async with self._changed:
                self._changed.notify_all()
        async with self._changed:
            self._closed.add(name)
            self._changed.notify_all()

    async def wait_line(self, stream: Stream, pattern: str) -> re.Match[str]:
        """The first line of `stream` matching `pattern`, seen already or awaited.

        Raises LineNotSeen after `wait_limit_s`, or as soon as the stream ends without it.
        """
        regex = re.compile(pattern)
        lines = self.stdout if stream == "stdout" else self.stderr
        found: list[re.Match[str]] = []
        checked = 0

        def seen() -> bool:
            nonlocal checked
            while checked < len(lines) and not found:
                if match := regex.search(lines[checked]):
                    found.append(match)
                checked += 1
            return bool(found) or stream in self._closed

        try:
            async with asyncio.timeout(self.wait_limit_s), self._changed:
                await self._changed.wait_for(seen)
        except TimeoutError:
            raise LineNotSeen(self._explain(f"no {stream} line matching {pattern!r}")) from None
        if not found:
            raise LineNotSeen(self._explain(f"{stream} ended without a line matching {pattern!r}"))
        return found[0]

    async def wait_listening(self) -> float:
        """Await the listening line; records the bound port and returns startup_ms."""
        match = await self.wait_line("stderr", LISTENING_RE)
        self.port = int(match["port"])
        return float(match["ms"])

    async def wait_exit(self) -> int:
        """The exit code, once the process has exited and its output is fully read."""
        try:
            async with asyncio.timeout(self.wait_limit_s):
                code = await self.proc.wait()
                await asyncio.gather(*self._pumps)
        except TimeoutError:
            raise AssertionError(self._explain("backend did not exit in time")) from None
        return code

    async def terminate(self) -> int:
        """SIGTERM the backend (not its group) and return its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return await self.wait_exit()

    def stub(self) -> backend_pb2_grpc.BackendStub:
        """A client for the backend, on a channel that `aclose` closes."""
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.addr)
        return backend_pb2_grpc.BackendStub(self._channel)  # type: ignore[no-untyped-call]

    async def aclose(self) -> None:
        """Kill the whole process group and reap the backend; safe to call twice."""
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None
        # Killing the group even after the leader exited reaches leftover grandchildren;
        # Linux does not hand out a pid while it still names a live group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    def _explain(self, what: str) -> str:
        tail = "\n".join(self.stderr[-20:])
        return f"{what} (pid {self.pid}, exit {self.proc.returncode}); stderr tail:\n{tail}"


async def start_backend(
    *args: str,
    host: str = "127.0.0.1",
    port: int | None = None,
    ready: bool = True,
    wait_limit_s: float = 10.0,
    module: str = ECHO_MODULE,
) -> BackendProc:
    """Start the backend on `port` (a free one if None; 0 lets it pick); `module` is
    ECHO_MODULE or `modeld.backends.echo_http`, the demo over HTTP.

    With `ready`, returns only once it prints its listening line; if it exits or
    misses `wait_limit_s` first, it is cleaned up and LineNotSeen is raised.
    """
    port = free_port(host) if port is None else port
    proc = await asyncio.create_subprocess_exec(
        *echo_argv(f"{host}:{port}", *args, module=module),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    backend = BackendProc(proc, host, port, wait_limit_s)
    if ready:
        try:
            await backend.wait_listening()
        except BaseException:
            await backend.aclose()
            raise
    return backend


@contextlib.asynccontextmanager
async def running_backend(
    *args: str,
    host: str = "127.0.0.1",
    port: int | None = None,
    ready: bool = True,
    wait_limit_s: float = 10.0,
    module: str = ECHO_MODULE,
) -> AsyncIterator[BackendProc]:
    """`start_backend` that always kills the process group on the way out."""
    backend = await start_backend(
        *args, host=host, port=port, ready=ready, wait_limit_s=wait_limit_s, module=module
    )
    try:
        yield backend
    finally:
        await backend.aclose()
