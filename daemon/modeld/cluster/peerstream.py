"""One RouteStream to another modeld, shared by every Route, Release and RenewLease
this modeld forwards there (`forward.Peers` keeps one per peer address).

Opened by the first call, and again by the first call after it broke. Each call
queues its message under a fresh id and waits for the answer with that id; one
reader task hands answers to their callers, so a slow call (a Route the owner
queues) holds back nobody. gRPC's own task writes the queued messages: a caller
cancelled while its message is being written would cancel the whole stream.

A broken stream fails every call waiting on it with its status (the
`grpc.aio.AioRpcError` a unary call would have raised); a stream that `close`
ended fails them with `StreamEnded`. A Route whose caller stopped waiting
(cancelled, or past its limit) is released when its answer comes: a unary call cut
after the owner had granted it lost the grant, its lease held until its TTL.

The messages stay opaque here (anything with an `id`): forward.py builds them and
says which answer is a grant to give back (`orphan`), so that it alone of the
cluster speaks protobuf.
"""

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, Protocol, TypeVar

import grpc


class Tagged(Protocol):
    """A stream message: its id pairs an answer with its request."""

    id: int


Req = TypeVar("Req", bound=Tagged)
Resp = TypeVar("Resp", bound=Tagged)
ENDED = "the RouteStream ended; the next call opens a new one"


class StreamEnded(Exception):
    """The stream ended without an error status: `close`d, or ended by the peer."""


class PeerStream(Generic[Req, Resp]):
    def __init__(
        self,
        opener: Callable[[AsyncIterator[Req]], Any],
        orphan: Callable[[Resp], Req | None],
        *,
        closed_reason: str,
    ) -> None:
        """`opener` opens the stream on these requests (the stub's RouteStream, with
        its metadata); `orphan` is the request that gives back what an answer nobody
        waits for any more granted (None: nothing to give back)."""
        self._opener = opener
        self._orphan = orphan
        self._closed_reason = closed_reason
        self._requests: asyncio.Queue[Req | None] | None = None
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Resp]] = {}
        self._ids = itertools.count(1)
        self._closed = False

    async def call(self, request: Req, limit_s: float) -> Resp:
        """The answer to `request` (its id is set here), within `limit_s` (TimeoutError)."""
        call_id = request.id = next(self._ids)
        # Waiting before the message is queued, in one loop turn with it: a reader that
        # ends after this fails this call too.
        answer: asyncio.Future[Resp] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = answer
        try:
            self._open().put_nowait(request)
            async with asyncio.timeout(limit_s):
                return await answer
        finally:
            self._pending.pop(call_id, None)

    def _open(self) -> asyncio.Queue[Req | None]:
        if self._closed:
            raise StreamEnded(self._closed_reason)
        if self._requests is None:
            requests: asyncio.Queue[Req | None] = asyncio.Queue()
            self._call = self._opener(_drain(requests))
            self._requests = requests
            self._reader = asyncio.get_running_loop().create_task(self._read(self._call, requests))
        return self._requests

    async def _read(self, call: Any, requests: asyncio.Queue[Req | None]) -> None:
        error: Exception = StreamEnded(ENDED)
        try:
            async for answer in call:
                waiter = self._pending.pop(answer.id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(answer)
                elif (release := self._orphan(answer)) is not None:
                    release.id = next(self._ids)
                    requests.put_nowait(release)
        except grpc.aio.AioRpcError as exc:
            error = exc
        finally:
            if self._closed:
                error = StreamEnded(self._closed_reason)
            if self._requests is requests:
                self._requests = self._call = None
            # Ends the request iterator, so that gRPC's writing task ends with the call.
            requests.put_nowait(None)
            for waiter in self._pending.values():
                if not waiter.done():
                    waiter.set_exception(error)

    async def close(self) -> None:
        """End the stream for good: the calls waiting on it fail with StreamEnded."""
        self._closed = True
        call, reader = self._call, self._reader
        if call is not None:
            call.cancel()
        if reader is not None:
            await asyncio.gather(reader, return_exceptions=True)


async def _drain(requests: asyncio.Queue[Req | None]) -> AsyncIterator[Req]:
    while (request := await requests.get()) is not None:
        yield request
