"""Talking to one backend: health, LoadModel, Free, Status, each with its own deadline.

`grpc` backends speak the LocalAI backend protocol; `http` backends are any
OpenAI-style server whose health URL answers 200. A call never waits longer
than the deadline it is given, and a failed health probe is just `False`.

A start wants more than yes or no from an HTTP health URL (`answer`): 200 is
ready, 503 is loading (llama-server's answer while it reads the model), a
refused connection is a server not listening yet, and any other 4xx says the
health path is wrong, which no amount of waiting mends.
"""

import asyncio
import contextlib
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import grpc

from modeld._proto.backend import backend_pb2 as pb
from modeld._proto.backend import backend_pb2_grpc as pb_grpc
from modeld.load_options import ModelLoad

# gRPC's default reconnect backoff (1 s, growing) would make a probe sent a few
# ms before the backend listens wait a second; the daemon paces probes itself.
# min_reconnect_backoff_ms is not a backoff floor: gRPC gives each connection
# attempt that long to finish its handshake, so a short one fails calls to a
# backend that is merely slow to answer (a loaded machine); every call has its
# own deadline anyway. A local subchannel pool keeps a new channel from
# inheriting another's backoff, and a backend on loopback is never reached
# through an HTTP proxy.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 5),
    ("grpc.min_reconnect_backoff_ms", 20_000),
    ("grpc.max_reconnect_backoff_ms", 250),
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.enable_http_proxy", 0),
)


class BackendCallError(Exception):
    """A backend call failed or the backend said no; the message says which and why."""


class Verdict(Enum):
    READY = "ready"
    LOADING = "loading"  # HTTP 503: alive and loading, which is progress
    NOT_LISTENING = "not listening"  # the connection was refused
    WRONG_PATH = "wrong path"  # HTTP 4xx other than 503: waiting cannot mend it
    NO_ANSWER = "no answer"  # timed out, reset, or an answer that means none of the above


@dataclass(frozen=True, slots=True)
class Answer:
    verdict: Verdict
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.READY


class HealthProbe(Protocol):
    async def health(self, limit_s: float) -> bool: ...

    async def close(self) -> None: ...


async def port_refuses(host: str, port: int, limit_s: float) -> bool:
    """True only when a connection to the port is refused; a slow or failed connect
    is no such proof."""
    try:
        async with asyncio.timeout(limit_s):
            _, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        return True
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcBackend:
    """A channel to one gRPC backend; close() it when the replica is done with it."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        stub = pb_grpc.BackendStub(self._channel)  # type: ignore[no-untyped-call]
        # The generated stub is untyped; these annotations restore the message types.
        self._health: grpc.aio.UnaryUnaryMultiCallable[pb.HealthMessage, pb.Reply] = stub.Health
        self._load: grpc.aio.UnaryUnaryMultiCallable[pb.ModelOptions, pb.Result] = stub.LoadModel
        self._free: grpc.aio.UnaryUnaryMultiCallable[pb.HealthMessage, pb.Result] = stub.Free
        self._status: grpc.aio.UnaryUnaryMultiCallable[pb.HealthMessage, pb.StatusResponse] = (
            stub.Status
        )

    async def health(self, limit_s: float) -> bool:
        try:
            await self._health(pb.HealthMessage(), timeout=limit_s)
        except grpc.aio.AioRpcError:
            return False
        return True

    async def load_model(self, load: ModelLoad, limit_s: float) -> str:
        """LoadModel; returns the backend's message, raises BackendCallError on any failure."""
        try:
            result = await self._load(model_options(load), timeout=limit_s)
        except grpc.aio.AioRpcError as exc:
            raise BackendCallError(f"LoadModel failed: {_rpc_error(exc)}") from None
        if not result.success:
            raise BackendCallError(f"LoadModel refused: {result.message or '(no message)'}")
        return result.message

    async def free(self, limit_s: float) -> bool:
        """Ask the backend to release its model; whether it did is only ever advisory."""
        try:
            result = await self._free(pb.HealthMessage(), timeout=limit_s)
        except grpc.aio.AioRpcError:
            return False
        return result.success

    async def status(self, limit_s: float) -> pb.StatusResponse:
        try:
            return await self._status(pb.HealthMessage(), timeout=limit_s)
        except grpc.aio.AioRpcError as exc:
            raise BackendCallError(f"Status failed: {_rpc_error(exc)}") from None

    async def close(self) -> None:
        await self._channel.close(None)


async def grpc_health_once(address: str, limit_s: float) -> bool:
    """One Health call on a channel of its own, so no earlier failed connect delays it."""
    backend = GrpcBackend(address)
    try:
        return await backend.health(limit_s)
    finally:
        await backend.close()


async def grpc_answer_once(address: str, limit_s: float) -> Answer:
    if await grpc_health_once(address, limit_s):
        return Answer(Verdict.READY)
    return Answer(Verdict.NO_ANSWER, f"gRPC Health at {address} did not answer")


def _rpc_error(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details() or '(no details)'}"


class HttpBackend:
    """Health of an HTTP backend: one `GET health_path` per probe, 200 means healthy."""

    def __init__(self, host: str, port: int, health_path: str) -> None:
        self.address = host_port(host, port)
        self.url = f"http://{self.address}{health_path}"
        self._host = host
        self._port = port
        self._request = (
            f"GET {health_path} HTTP/1.1\r\nHost: {self.address}\r\n"
            "User-Agent: modeld\r\nConnection: close\r\n\r\n"
        ).encode()

    async def health(self, limit_s: float) -> bool:
        return (await self.answer(limit_s)).ok

    async def answer(self, limit_s: float) -> Answer:
        """What one `GET health_path` says about the server (see the module doc)."""
        try:
            async with asyncio.timeout(limit_s):
                status_line = await self._get()
        except ConnectionRefusedError:
            return Answer(Verdict.NOT_LISTENING, f"GET {self.url}: connection refused")
        except TimeoutError:
            return Answer(Verdict.NO_ANSWER, f"GET {self.url}: no answer within {limit_s:g}s")
        except (OSError, asyncio.IncompleteReadError) as exc:
            return Answer(Verdict.NO_ANSWER, f"GET {self.url}: {type(exc).__name__}")
        parts = status_line.split(maxsplit=2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            return Answer(Verdict.NO_ANSWER, f"GET {self.url}: not an HTTP answer")
        status = int(parts[1])
        said = status_line.decode("latin-1").strip()
        if status == 200:
            return Answer(Verdict.READY)
        if status == 503:
            return Answer(Verdict.LOADING, f"GET {self.url} answered {said}")
        if 400 <= status < 500:
            return Answer(Verdict.WRONG_PATH, f"GET {self.url} answered {said}")
        return Answer(Verdict.NO_ANSWER, f"GET {self.url} answered {said}")

    async def _get(self) -> bytes:
        reader, writer = await asyncio.open_connection(self._host, self._port)
        try:
            writer.write(self._request)
            await writer.drain()
            return await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        """Nothing is kept open between probes."""


def model_options(load: ModelLoad) -> pb.ModelOptions:
    """LoadModel's request: documented options as typed fields, the rest as "key:value"."""
    opts = pb.ModelOptions(Model=load.model, ModelFile=load.model_file, ModelPath=load.models_dir)
    for field, value in load.options.typed.items():
        if isinstance(value, list):
            getattr(opts, field).extend(value)
        else:
            setattr(opts, field, value)
    opts.Options.extend(load.options.extra)
    return opts
