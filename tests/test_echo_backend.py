"""The demo backend, as a real process over real gRPC."""

import asyncio
import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

from backend_proc import BackendProc, running_backend, start_backend
from modeld._proto.backend import backend_pb2 as pb
from modeld.backends.echo import embed, load_settings, parse_flags

Status = pb.StatusResponse


async def load(backend: BackendProc, **fields: Any) -> pb.Result:
    result: pb.Result = await backend.stub().LoadModel(pb.ModelOptions(**fields))
    return result


async def status(backend: BackendProc) -> pb.StatusResponse:
    reply: pb.StatusResponse = await backend.stub().Status(pb.HealthMessage())
    return reply


async def wait_pidfd(pidfd: int) -> None:
    """Wait for the process behind a pidfd (any process, not only a child) to exit."""
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await gone
    finally:
        loop.remove_reader(pidfd)


def ignored_signals(pid: int) -> int:
    """The SigIgn mask of a process (bit n-1 set: signal n is ignored)."""
    fields = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^SigIgn:\s*([0-9a-f]+)$", fields, re.MULTILINE)
    assert match is not None
    return int(match[1], 16)


async def test_serves_the_backend_protocol() -> None:
    async with running_backend() as backend:
        stub = backend.stub()
        assert (await stub.Health(pb.HealthMessage())).message == b"OK"
        before = await status(backend)
        assert before.state == Status.UNINITIALIZED
        assert before.memory.total == 1 << 20
        assert before.memory.breakdown["startup_us"] > 0
        assert "load_us" not in before.memory.breakdown

        loaded = await load(backend, Model="echo")
        assert loaded.success, loaded.message
        assert re.search(r"^loaded in [\d.]+ ms load_ms=[\d.]+$", loaded.message)
        after = await status(backend)
        assert after.state == Status.READY
        assert after.memory.breakdown["load_us"] > 0

        reply = await stub.Predict(pb.PredictOptions(Prompt="hello  brave new\nworld"))
        assert reply.message == b"hello  brave new\nworld"
        assert reply.tokens == 4
        vec = await stub.Embedding(pb.PredictOptions(Prompt="hello"))
        assert list(vec.embeddings) == [round_f32(x) for x in embed("hello")]
        assert len(vec.embeddings) == 8
        assert embed("hello") != embed("hello!")

        freed = await stub.Free(pb.HealthMessage())
        assert freed.success
        assert (await status(backend)).state == Status.UNINITIALIZED


def round_f32(x: float) -> float:
    return pb.EmbeddingResult(embeddings=[x]).embeddings[0]


async def test_listening_line_reports_bound_port_and_startup() -> None:
    async with running_backend(port=0) as backend:
        assert backend.port != 0
        assert sum("listening" in line for line in backend.stderr) == 1
        line = backend.stderr[-1]
        match = re.fullmatch(
            r"echo_backend listening addr=127\.0\.0\.1:(\d+) startup_ms=([\d.]+)", line
        )
        assert match is not None, line
        assert int(match[1]) == backend.port
        startup_us = (await status(backend)).memory.breakdown["startup_us"]
        assert abs(startup_us / 1000 - float(match[2])) < 1.0


async def test_load_checks_the_model_file(tmp_path: Path) -> None:
    (tmp_path / "real.gguf").write_bytes(b"weights")
    async with running_backend() as backend:
        missing = await load(backend, ModelFile=str(tmp_path / "nope.gguf"))
        assert not missing.success
        assert missing.message == f"model file not found: {tmp_path / 'nope.gguf'}"
        assert (await status(backend)).state == Status.UNINITIALIZED
        await backend.wait_line("stderr", r"^error: model file not found: ")

        joined_missing = await load(backend, ModelPath=str(tmp_path), Model="other.gguf")
        assert not joined_missing.success
        assert (await load(backend, ModelPath=str(tmp_path), Model="real.gguf")).success
        assert (await load(backend, ModelFile=str(tmp_path / "real.gguf"))).success


async def test_load_options_make_one_load_slow_or_fail() -> None:
    async with running_backend() as backend:
        failed = await load(backend, Model="echo", Options=["fail=1"])
        assert (failed.success, failed.message) == (False, "load failed on purpose")
        slow = await load(backend, Model="echo", Options=["threads=4", "load_delay=0.2"])
        assert slow.success
        load_ms = float(slow.message.rpartition("load_ms=")[2])
        assert load_ms >= 200
        assert (await status(backend)).memory.breakdown["load_us"] >= 200_000
        bad = await load(backend, Model="echo", Options=["load_delay=soon"])
        assert not bad.success


def test_load_settings_parse_both_separators() -> None:
    flags = parse_flags(["--addr", "127.0.0.1:1", "--load-delay", "1.5"])
    assert load_settings([], flags) == (1.5, False)
    assert load_settings(["load_delay:0.25", "fail:true"], flags) == (0.25, True)
    assert load_settings(["fail=0"], parse_flags(["--addr", "h:1", "--fail-load"])) == (0.0, False)


async def test_fail_load_flag_and_memory_figure() -> None:
    async with running_backend("--fail-load", "--memory-bytes", "4096") as backend:
        result = await load(backend, Model="echo")
        assert (result.success, result.message) == (False, "load failed on purpose")
        reply = await status(backend)
        assert (reply.state, reply.memory.total) == (Status.UNINITIALIZED, 4096)


async def test_exit_on_start_exits_with_the_code() -> None:
    backend = await start_backend("--exit-on-start", "7", ready=False)
    try:
        assert await backend.wait_exit() == 7
        assert "fatal: exiting on purpose with 7" in backend.stderr
        assert not any("listening" in line for line in backend.stderr)
    finally:
        await backend.aclose()


async def test_busy_port_exits_98() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        backend = await start_backend(port=port, ready=False)
        try:
            assert await backend.wait_exit() == 98
            assert f"address already in use: 127.0.0.1:{port}" in backend.stderr
        finally:
            await backend.aclose()


async def test_second_backend_on_same_port_exits_98() -> None:
    async with running_backend() as first:
        second = await start_backend(port=first.port, ready=False)
        try:
            assert await second.wait_exit() == 98
        finally:
            await second.aclose()
        assert (await first.stub().Health(pb.HealthMessage())).message == b"OK"


async def test_sigterm_stops_gracefully() -> None:
    async with running_backend() as backend:
        assert await backend.terminate() == 0
        assert backend.stderr[-1] == "echo_backend stopping"


async def test_sigterm_during_start_delay_exits_at_once() -> None:
    async with running_backend("--start-delay", "60", ready=False) as backend:
        await backend.wait_line("stdout", r"^starting\.\.\. 1$")
        assert await backend.terminate() == 0
        assert not any("listening" in line for line in backend.stderr)


async def test_start_delay_prints_progress_then_listens() -> None:
    async with running_backend("--start-delay", "0.3") as backend:
        await backend.wait_line("stdout", r"^starting\.\.\. 3$")
        assert backend.stdout[:3] == ["starting... 1", "starting... 2", "starting... 3"]


async def test_ignore_sigterm_sets_sig_ign() -> None:
    async with running_backend("--ignore-sigterm") as backend:
        assert ignored_signals(backend.pid) & (1 << (signal.SIGTERM - 1))


async def test_grandchild_shares_the_group_and_dies_with_it() -> None:
    async with running_backend("--spawn-grandchild") as backend:
        match = await backend.wait_line("stdout", r"^grandchild pid=(\d+)$")
        grandchild = int(match[1])
        assert os.getpgid(grandchild) == os.getpgid(backend.pid)
        assert await backend.terminate() == 0
        assert os.getpgid(grandchild) == backend.pid  # outlives a plain SIGTERM
        pidfd = os.pidfd_open(grandchild)
    try:
        async with asyncio.timeout(10):
            await wait_pidfd(pidfd)
    finally:
        os.close(pidfd)


async def test_flood_keeps_serving() -> None:
    async with running_backend("--flood", "20000") as backend:
        await backend.wait_line("stdout", r"^flood line 19999$")
        assert backend.stdout == [f"flood line {i}" for i in range(20000)]
        assert (await backend.stub().Health(pb.HealthMessage())).message == b"OK"


async def test_chatty_prints_numbered_lines_without_end_and_keeps_serving() -> None:
    async with running_backend("--chatty", "1e9") as backend:
        await backend.wait_line("stdout", r"^chatty line 20000$")
        assert backend.stdout[:20001] == [f"chatty line {i}" for i in range(20001)]
        assert (await backend.stub().Health(pb.HealthMessage())).message == b"OK"
        await backend.wait_line("stdout", r"^chatty line 40000$")
        assert await backend.terminate() == 0


async def test_crash_after_exits_3() -> None:
    async with running_backend("--crash-after", "0.1") as backend:
        assert await backend.wait_exit() == 3
        assert backend.stderr[-1] == "fatal: crashing on purpose"
