"""The demo backend: speaks the LocalAI backend protocol and misbehaves on request.

Run as `python -m modeld.backends.echo --addr HOST:PORT [flags]`. The default
config serves it as model `echo`, and the test suite drives every failure mode
of a real backend (slow start, failed load, crash, ignored SIGTERM, leaked
grandchild, log flood, endless chatter) through its flags. Start order: signal
handlers, grandchild, start delay (SIGTERM ends it at once), exit-on-start, bind,
listening line, flood, chatter and crash timer.

Its output lines are a contract with the daemon and its benchmark, so they are
plain `print`s in a fixed format rather than structured logs.
"""
# ruff: noqa: E402
# The first statements take a timestamp before the heavier imports below, so that
# the reported startup time includes them even when /proc cannot be read.

import time

_IMPORTED_AT = time.monotonic()

import argparse
import asyncio
import contextlib
import errno
import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from modeld._proto.backend import backend_pb2 as pb
from modeld._proto.backend import backend_pb2_grpc as pb_grpc

EXIT_ADDR_IN_USE = 98  # errno EADDRINUSE, as other servers report it
EXIT_CRASH = 3
DEFAULT_MEMORY_BYTES = 1 << 20
EMBEDDING_SIZE = 8
STOP_GRACE_S = 2.0
PROGRESS_INTERVAL_S = 0.1
FLOOD_BATCH = 512
CHATTY_TICK_S = 0.01


@dataclass(frozen=True)
class Flags:
    host: str
    port: int
    start_delay: float = 0.0
    load_delay: float = 0.0
    fail_load: bool = False
    exit_on_start: int | None = None
    ignore_sigterm: bool = False
    spawn_grandchild: bool = False
    flood: int = 0
    chatty: float = 0.0
    crash_after: float | None = None
    memory_bytes: int = DEFAULT_MEMORY_BYTES

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"


def split_addr(addr: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 hosts in brackets) → (host, port); raises ValueError."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {addr!r}")
    return host, int(port)


def parse_flags(argv: list[str] | None = None) -> Flags:
    parser = argparse.ArgumentParser(prog="python -m modeld.backends.echo", description=__doc__)
    parser.add_argument("--addr", required=True, help="HOST:PORT to listen on (port 0: any)")
    parser.add_argument("--start-delay", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--load-delay", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--fail-load", action="store_true")
    parser.add_argument("--exit-on-start", type=int, default=None, metavar="CODE")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--spawn-grandchild", action="store_true")
    parser.add_argument("--flood", type=int, default=0, metavar="N")
    parser.add_argument(
        "--chatty",
        type=float,
        default=0.0,
        metavar="RATE",
        help="print RATE lines per second to stdout until stopped (a huge RATE: no pause)",
    )
    parser.add_argument("--crash-after", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--memory-bytes", type=int, default=DEFAULT_MEMORY_BYTES, metavar="N")
    ns = parser.parse_args(argv)
    try:
        host, port = split_addr(ns.addr)
    except ValueError as exc:
        parser.error(str(exc))
    return Flags(
        host=host,
        port=port,
        start_delay=ns.start_delay,
        load_delay=ns.load_delay,
        fail_load=ns.fail_load,
        exit_on_start=ns.exit_on_start,
        ignore_sigterm=ns.ignore_sigterm,
        spawn_grandchild=ns.spawn_grandchild,
        flood=ns.flood,
        chatty=ns.chatty,
        crash_after=ns.crash_after,
        memory_bytes=ns.memory_bytes,
    )


def seconds_since_process_start() -> float:
    """Age of this process, from the kernel's start time when /proc has it.

    /proc counts in clock ticks (usually 10 ms), so this may overstate the age by
    up to one tick; it never reports less than the time since this module loaded.
    """
    since_import = time.monotonic() - _IMPORTED_AT
    try:
        stat = Path("/proc/self/stat").read_text()
        # The command name (field 2) may hold spaces; fields after its ')' are fixed.
        start_ticks = int(stat.rpartition(")")[2].split()[19])
        booted = time.clock_gettime(time.CLOCK_BOOTTIME)
        age = booted - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return since_import
    return max(age, since_import)


def embed(prompt: str) -> list[float]:
    """A deterministic vector in [-1, 1) derived from the prompt's sha256."""
    digest = hashlib.sha256(prompt.encode()).digest()
    words = struct.unpack(f">{EMBEDDING_SIZE}I", digest)
    return [w / 2**31 - 1.0 for w in words]


def model_file_of(request: pb.ModelOptions) -> Path | None:
    """The file a load names: ModelFile, else ModelPath/Model; None when none is named."""
    if request.ModelFile:
        return Path(request.ModelFile)
    if request.ModelPath and request.Model:
        return Path(request.ModelPath) / request.Model
    return None


def load_settings(options: list[str], flags: Flags) -> tuple[float, bool]:
    """(load delay, fail) for one load: `load_delay=S` / `fail=1` options override flags."""
    delay, fail = flags.load_delay, flags.fail_load
    for entry in options:
        key, _, value = entry.replace(":", "=", 1).partition("=")
        if key.strip() == "load_delay":
            delay = float(value)
        elif key.strip() == "fail":
            fail = value.strip().lower() in {"1", "true", "yes", "on"}
    return delay, fail


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class EchoBackend(pb_grpc.BackendServicer):
    """Loads nothing, echoes prompts, and reports its start and load times in Status."""

    def __init__(self, flags: Flags) -> None:
        self._flags = flags
        self._loaded = False
        self._loading = 0
        self._load_us = 0
        # Set once the server listens; a Status that races the start just omits it.
        self.startup_us = 0

    async def Health(
        self,
        request: pb.HealthMessage,
        context: grpc.aio.ServicerContext[pb.HealthMessage, pb.Reply],
    ) -> pb.Reply:
        return pb.Reply(message=b"OK")

    async def LoadModel(
        self,
        request: pb.ModelOptions,
        context: grpc.aio.ServicerContext[pb.ModelOptions, pb.Result],
    ) -> pb.Result:
        started = time.monotonic()
        path = model_file_of(request)
        if path is not None and not path.is_file():
            return self._load_failed(f"model file not found: {path}")
        try:
            delay, fail = load_settings(list(request.Options), self._flags)
        except ValueError:
            return self._load_failed(f"bad load options: {list(request.Options)}")
        self._loading += 1
        try:
            await asyncio.sleep(delay)
        finally:
            self._loading -= 1
        if fail:
            return self._load_failed("load failed on purpose")
        load_s = time.monotonic() - started
        self._loaded, self._load_us = True, int(load_s * 1e6)
        load_ms = load_s * 1000
        return pb.Result(success=True, message=f"loaded in {load_ms:.1f} ms load_ms={load_ms:.3f}")

    def _load_failed(self, message: str) -> pb.Result:
        self._loaded = False
        _err(f"error: {message}")
        return pb.Result(success=False, message=message)

    async def Free(
        self,
        request: pb.HealthMessage,
        context: grpc.aio.ServicerContext[pb.HealthMessage, pb.Result],
    ) -> pb.Result:
        self._loaded = False
        return pb.Result(success=True, message="freed")

    async def Status(
        self,
        request: pb.HealthMessage,
        context: grpc.aio.ServicerContext[pb.HealthMessage, pb.StatusResponse],
    ) -> pb.StatusResponse:
        if self._loading:
            state = pb.StatusResponse.BUSY
        elif self._loaded:
            state = pb.StatusResponse.READY
        else:
            state = pb.StatusResponse.UNINITIALIZED
        breakdown = {"startup_us": self.startup_us} if self.startup_us else {}
        if self._loaded:
            breakdown["load_us"] = self._load_us
        memory = pb.MemoryUsageData(total=self._flags.memory_bytes, breakdown=breakdown)
        return pb.StatusResponse(state=state, memory=memory)

    async def Predict(
        self,
        request: pb.PredictOptions,
        context: grpc.aio.ServicerContext[pb.PredictOptions, pb.Reply],
    ) -> pb.Reply:
        words = len(request.Prompt.split())
        return pb.Reply(message=request.Prompt.encode(), tokens=words, prompt_tokens=words)

    async def Embedding(
        self,
        request: pb.PredictOptions,
        context: grpc.aio.ServicerContext[pb.PredictOptions, pb.EmbeddingResult],
    ) -> pb.EmbeddingResult:
        return pb.EmbeddingResult(embeddings=embed(request.Prompt))


def install_signal_handlers(stop: asyncio.Event, ignore_sigterm: bool) -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        loop.add_signal_handler(signal.SIGTERM, stop.set)


def spawn_grandchild() -> None:
    """Leave a long sleeper in our process group, as backends with worker processes do."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(1000)"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    print(f"grandchild pid={child.pid}", flush=True)


async def start_delay(seconds: float, stop: asyncio.Event) -> bool:
    """Wait `seconds`, printing progress; False if asked to stop meanwhile."""
    deadline = time.monotonic() + seconds
    ticks = 0
    while (left := deadline - time.monotonic()) > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(PROGRESS_INTERVAL_S, left)):
                await stop.wait()
        if stop.is_set():
            return False
        ticks += 1
        print(f"starting... {ticks}", flush=True)
    return True


def flood(lines: int) -> None:
    """Write `lines` lines to stdout as fast as the reader takes them.

    Writes go straight to fd 1 so a reader that stops reading blocks only this
    thread, and nothing is left in Python's buffer to block the exit.
    """
    for first in range(0, lines, FLOOD_BATCH):
        if not _write_lines("flood", first, min(first + FLOOD_BATCH, lines)):
            return


def chatter(rate: float) -> None:
    """Write `rate` lines per second to stdout for as long as the process lives.

    What fell due in the last CHATTY_TICK_S is written in blocks, as a program with
    buffered output does; lines that fall due while the reader is slow are written
    at once, back to back, so a large rate writes without pause.
    """
    started = time.monotonic()
    written = 0
    while True:
        due = int((time.monotonic() - started) * rate)
        if due <= written:
            time.sleep(CHATTY_TICK_S)
            continue
        end = min(due, written + FLOOD_BATCH)
        if not _write_lines("chatty", written, end):
            return
        written = end


def _write_lines(kind: str, first: int, end: int) -> bool:
    """Writes lines `first`..`end`-1 straight to fd 1; False once stdout is gone."""
    data = "".join(f"{kind} line {i}\n" for i in range(first, end)).encode()
    try:
        while data:
            data = data[os.write(1, data) :]
    except OSError:
        return False
    return True


def crash() -> None:
    _err("fatal: crashing on purpose")
    os._exit(EXIT_CRASH)


def bind_failure(flags: Flags) -> int:
    """Report why gRPC could not bind (it does not say) and pick the exit code."""
    host = flags.host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, flags.port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            _err(f"address already in use: {flags.addr}")
            return EXIT_ADDR_IN_USE
        _err(f"cannot listen on {flags.addr}: {exc.strerror}")
        return 1
    _err(f"cannot listen on {flags.addr}")
    return 1


async def serve(flags: Flags) -> int:
    """Run the backend until SIGTERM/SIGINT; returns the process exit code."""
    stop = asyncio.Event()
    install_signal_handlers(stop, flags.ignore_sigterm)
    if flags.spawn_grandchild:
        spawn_grandchild()
    if not await start_delay(flags.start_delay, stop):
        _err("echo_backend stopping")
        return 0
    if flags.exit_on_start is not None:
        _err(f"fatal: exiting on purpose with {flags.exit_on_start}")
        return flags.exit_on_start
    # Without this gRPC sets SO_REUSEPORT, and a second backend on a busy port would
    # silently share it instead of failing.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    backend = EchoBackend(flags)
    # The generated registration helper has no type annotations.
    pb_grpc.add_BackendServicer_to_server(backend, server)  # type: ignore[no-untyped-call]
    try:
        port = server.add_insecure_port(flags.addr)
    except RuntimeError:
        return bind_failure(flags)
    await server.start()
    startup_s = seconds_since_process_start()
    backend.startup_us = max(1, int(startup_s * 1e6))
    _err(f"echo_backend listening addr={flags.host}:{port} startup_ms={startup_s * 1000:.1f}")
    if flags.flood:
        threading.Thread(target=flood, args=(flags.flood,), name="flood", daemon=True).start()
    if flags.chatty > 0:
        threading.Thread(target=chatter, args=(flags.chatty,), name="chatty", daemon=True).start()
    if flags.crash_after is not None:
        asyncio.get_running_loop().call_later(flags.crash_after, crash)
    await stop.wait()
    _err("echo_backend stopping")
    await server.stop(STOP_GRACE_S)
    return 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(asyncio.run(serve(parse_flags(argv))))


if __name__ == "__main__":
    main()
