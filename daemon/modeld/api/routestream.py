"""RouteStream: Route, Release and RenewLease on one long-lived bidirectional stream.

Every message is answered with its id, by the same `LeaseCalls` the unary calls
use. A call that can be answered in the same loop turn (a warm Route, any Release
or RenewLease on a single host) is answered inline, in arrival order; one that must
wait (a cold start, a cluster call) runs as a task of the stream and is answered
when it is done, so answers may come in any order. gRPC takes one message write
per call at a time, so answers go out one at a time.

A failed call is answered with a `StreamError` (the status name and the message
the unary call would end with) and the stream goes on. When the client closes its
side, the calls still waiting are answered, then the stream ends. When the stream
breaks (the client cancels, or goes away) its waiting calls are cancelled and
nothing is released: a lease lives until it is released or its TTL runs out. When
the daemon stops, every stream ends with UNAVAILABLE.
"""

import asyncio
from collections.abc import AsyncIterator

import structlog

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.api.convert import Malformed
from modeld.api.leasing import LeaseCalls
from modeld.api.status import Ctx, reply_for
from modeld.errors import InvalidArgument, Unavailable

Requests = AsyncIterator[pb.RouteStreamRequest | Malformed]
STOPPING = "modeld is shutting down; leases held stay until released or expired"


class RouteStreams:
    """Serves every RouteStream of the daemon; `close` ends them all (the daemon stops)."""

    def __init__(self, calls: LeaseCalls) -> None:
        self._calls = calls
        self._open: set[asyncio.Task[None]] = set()
        self._closing = False

    def close(self) -> None:
        self._closing = True
        for task in self._open:
            task.cancel()

    async def serve(self, requests: Requests, context: Ctx) -> None:
        if self._closing:
            raise Unavailable(STOPPING)
        task = asyncio.current_task()
        assert task is not None
        self._open.add(task)
        try:
            await _Stream(self._calls, context).run(requests)
        except asyncio.CancelledError:
            if not self._closing:
                raise
            # Cancelled by `close`, not by gRPC: the client hears why.
            raise Unavailable(STOPPING) from None
        finally:
            self._open.discard(task)


class _Stream:
    def __init__(self, calls: LeaseCalls, context: Ctx) -> None:
        self._calls = calls
        self._context = context
        self._writing = asyncio.Lock()
        self._waiting: set[asyncio.Task[None]] = set()

    async def run(self, requests: Requests) -> None:
        try:
            async for request in requests:
                answer = self._now(request)
                if answer is not None:
                    await self._send(answer)
                else:
                    assert isinstance(request, pb.RouteStreamRequest)
                    task = asyncio.create_task(self._later(request))
                    self._waiting.add(task)
                    task.add_done_callback(self._waiting.discard)
            # The client closed its side (or cancelled: gRPC ends the requests alike),
            # what it asked for is still answered (a write to a cancelled call fails).
            if self._waiting:
                await asyncio.gather(*self._waiting)
        finally:
            for task in self._waiting:
                task.cancel()
            if self._waiting:
                await asyncio.gather(*self._waiting, return_exceptions=True)

    def _now(self, request: pb.RouteStreamRequest | Malformed) -> pb.RouteStreamResponse | None:
        """The answer when it is ready in this loop turn; None when the call must wait."""
        if isinstance(request, Malformed):
            return _error(0, InvalidArgument(f"not a valid {request.type_name}: {request.error}"))
        try:
            kind = request.WhichOneof("call")
            if kind == "route":
                route = self._calls.route_now(request.route)
                return None if route is None else pb.RouteStreamResponse(id=request.id, route=route)
            if kind == "release":
                release = self._calls.release_now(request.release)
                if release is None:
                    return None
                return pb.RouteStreamResponse(id=request.id, release=release)
            if kind == "renew":
                renew = self._calls.renew_now(request.renew)
                return None if renew is None else pb.RouteStreamResponse(id=request.id, renew=renew)
            raise InvalidArgument(f"request {request.id} names no call: route, release or renew")
        except Exception as exc:
            return _error(request.id, exc)

    async def _later(self, request: pb.RouteStreamRequest) -> None:
        try:
            kind = request.WhichOneof("call")
            if kind == "route":
                route = await self._calls.route(request.route, self._context)
                answer = pb.RouteStreamResponse(id=request.id, route=route)
            elif kind == "release":
                release = await self._calls.release(request.release, self._context)
                answer = pb.RouteStreamResponse(id=request.id, release=release)
            else:
                renew = await self._calls.renew(request.renew, self._context)
                answer = pb.RouteStreamResponse(id=request.id, renew=renew)
        except Exception as exc:
            answer = _error(request.id, exc)
        await self._send(answer)

    async def _send(self, answer: pb.RouteStreamResponse) -> None:
        async with self._writing:
            if not self._context.done():
                await self._context.write(answer)


def _error(call_id: int, exc: Exception) -> pb.RouteStreamResponse:
    request_id = structlog.contextvars.get_contextvars().get("request_id", "?")
    status, message = reply_for(exc, request_id)
    return pb.RouteStreamResponse(
        id=call_id, error=pb.StreamError(code=status.name, message=message)
    )
