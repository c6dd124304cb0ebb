"""Backend calls with their own deadlines: HTTP health, gRPC health and load."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from backend_proc import BackendProc, running_backend
from modeld._proto.backend import backend_pb2 as pb
from modeld.load_options import LoadOptions, ModelLoad
from modeld.supervisor.backend_client import (
    BackendCallError,
    GrpcBackend,
    HttpBackend,
    Verdict,
    grpc_health_once,
    port_refuses,
)
from modeld.supervisor.process import free_port


def load(*extra: str) -> ModelLoad:
    """A LoadModel of no model file, with the echo backend's own options in `extra`."""
    return ModelLoad("", "", "", LoadOptions({}, list(extra)))


@pytest.fixture
async def echo() -> AsyncIterator[BackendProc]:
    async with running_backend() as backend:
        yield backend


async def http_server(status: bytes) -> asyncio.Server:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


@pytest.mark.parametrize(("status", "healthy"), [(b"200 OK", True), (b"503 Loading", False)])
async def test_http_health_wants_200(status: bytes, healthy: bool) -> None:
    server = await http_server(status)
    async with server:
        port = server.sockets[0].getsockname()[1]
        assert await HttpBackend("127.0.0.1", port, "/health").health(1.0) is healthy


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (b"200 OK", Verdict.READY),
        (b"503 Service Unavailable", Verdict.LOADING),
        (b"404 Not Found", Verdict.WRONG_PATH),
        (b"405 Method Not Allowed", Verdict.WRONG_PATH),
        (b"500 Internal Server Error", Verdict.NO_ANSWER),
    ],
)
async def test_http_health_answers_say_what_they_mean(status: bytes, verdict: Verdict) -> None:
    server = await http_server(status)
    async with server:
        port = server.sockets[0].getsockname()[1]
        answer = await HttpBackend("127.0.0.1", port, "/health").answer(1.0)
    assert answer.verdict is verdict
    if verdict is not Verdict.READY:
        assert f"http://127.0.0.1:{port}/health" in answer.detail
        assert status.decode() in answer.detail


async def test_http_health_of_a_closed_port_is_false() -> None:
    backend = HttpBackend("127.0.0.1", free_port("127.0.0.1"), "/")
    assert not await backend.health(1.0)
    assert (await backend.answer(1.0)).verdict is Verdict.NOT_LISTENING


async def test_only_a_refused_connection_is_proof_nothing_listens() -> None:
    assert await port_refuses("127.0.0.1", free_port("127.0.0.1"), 1.0)
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        assert not await port_refuses("127.0.0.1", port, 1.0)


async def test_http_health_respects_its_deadline() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert not await HttpBackend("127.0.0.1", port, "/").health(0.1)
        # Without the deadline it would wait for the silent server forever.
        assert loop.time() - began < 10.0


async def test_grpc_health_of_a_closed_port_is_false_and_quick() -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    # Refused at once, not waited out until the deadline (generous for a loaded machine).
    assert not await grpc_health_once(f"127.0.0.1:{free_port('127.0.0.1')}", 30.0)
    assert loop.time() - began < 10.0


async def test_grpc_calls_against_the_echo_backend(echo: BackendProc) -> None:
    assert await grpc_health_once(echo.addr, 1.0)
    client = GrpcBackend(echo.addr)
    try:
        assert "loaded" in await client.load_model(load(), 2.0)
        assert (await client.status(1.0)).state == pb.StatusResponse.READY
        assert await client.free(1.0)
        with pytest.raises(BackendCallError, match="load failed on purpose"):
            await client.load_model(load("fail=1"), 2.0)
        with pytest.raises(BackendCallError, match="DEADLINE_EXCEEDED"):
            await client.load_model(load("load_delay=5"), 0.1)
    finally:
        await client.close()


# How long the backend's first bytes are held back: a busy machine, a busy backend.
SLOW_HANDSHAKE_S = 0.3


async def _slow_proxy(target: str) -> asyncio.Server:
    """A TCP proxy to `target` that holds the backend's first bytes (its HTTP/2
    SETTINGS) back for SLOW_HANDSHAKE_S: a connection that is slow, not refused."""
    host, port = target.rsplit(":", 1)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        backend_r, backend_w = await asyncio.open_connection(host, int(port))
        await asyncio.sleep(SLOW_HANDSHAKE_S)  # the fault injected, not a synchronisation
        await asyncio.gather(pipe(client_r, backend_w), pipe(backend_r, client_w))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_a_slow_connection_handshake_does_not_fail_the_call(echo: BackendProc) -> None:
    """The channel options once made every connection attempt give up after 5 ms
    (gRPC takes its minimum connect timeout from min_reconnect_backoff_ms): on a
    loaded machine LoadModel then failed with "connection attempt timed out before
    receiving SETTINGS frame"."""
    proxy = await _slow_proxy(echo.addr)
    async with proxy:
        address = f"127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
        client = GrpcBackend(address)
        try:
            assert "loaded" in await client.load_model(load(), 10.0)
        finally:
            await client.close()
        assert await grpc_health_once(address, 10.0)
