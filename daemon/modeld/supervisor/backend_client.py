"""Talking to one backend: health, LoadModel, Free, Status, each with its own deadline.

`grpc` backends speak the LocalAI backend protocol; `http` backends are any
OpenAI-style server whose health URL answers 200. A call never waits longer
than the deadline it is given, and a failed health probe is just `False`.
"""

import asyncio
import contextlib
from typing import Protocol

import grpc

from modeld._proto.backend import backend_pb2 as pb
from modeld._proto.backend import backend_pb2_grpc as pb_grpc

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


class HealthProbe(Protocol):
    async def health(self, limit_s: float) -> bool: ...

    async def close(self) -> None: ...


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

    async def load_model(self, options: pb.ModelOptions, limit_s: float) -> str:
        """LoadModel; returns the backend's message, raises BackendCallError on any failure."""
        try:
            result = await self._load(options, timeout=limit_s)
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


def _rpc_error(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details() or '(no details)'}"


class HttpBackend:
    """Health of an HTTP backend: one `GET health_path` per probe, 200 means healthy."""

    def __init__(self, host: str, port: int, health_path: str) -> None:
        self.address = host_port(host, port)
        self._host = host
        self._port = port
        self._request = (
            f"GET {health_path} HTTP/1.1\r\nHost: {self.address}\r\n"
            "User-Agent: modeld\r\nConnection: close\r\n\r\n"
        ).encode()

    async def health(self, limit_s: float) -> bool:
        try:
            async with asyncio.timeout(limit_s):
                status_line = await self._get()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            return False
        parts = status_line.split(maxsplit=2)
        return len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1] == b"200"

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
