"""`Client(stream=True)`: Route, Release and RenewLease over one RouteStream.

One stream per client, opened on the first call and again after it breaks. Each
call sends its message with a fresh id and waits for the answer with that id; one
reader (a task for `AsyncClient`, a thread for `Client`) hands answers to their
callers, so calls from many tasks or threads share the stream and a slow one (a
cold start) holds back nobody. A `StreamError` answer raises the same typed error
as the unary call; a broken stream fails the calls waiting on it with its status.
A Route whose caller stopped waiting (its timeout) is released when its answer
arrives, so giving up on a call leaves no lease behind.
"""

import asyncio
import concurrent.futures
import itertools
import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.client.errors import (
    DeadlineExceeded,
    ModeldError,
    Unavailable,
    from_rpc,
    from_stream_error,
)

# The unary method each stream call stands for, by the name of its field.
CALLS = {"Route": "route", "Release": "release", "RenewLease": "renew"}


def request_for(call_id: int, method: str, request: Any) -> pb.RouteStreamRequest:
    return pb.RouteStreamRequest(id=call_id, **{CALLS[method]: request})


def result_of(answer: pb.RouteStreamResponse) -> Any:
    """The unary reply an answer carries; its StreamError raised as the typed error."""
    kind = answer.WhichOneof("result")
    if kind == "error":
        raise from_stream_error(answer.error.code, answer.error.message)
    if kind is None:
        raise ModeldError(grpc.StatusCode.UNKNOWN, f"answer {answer.id} carries no result")
    return getattr(answer, kind)


def orphan_release(answer: pb.RouteStreamResponse) -> pb.ReleaseRequest | None:
    """The Release for a lease granted to a caller that is no longer waiting."""
    if answer.WhichOneof("result") != "route":
        return None
    return pb.ReleaseRequest(lease_id=answer.route.lease_id)


def ended(addr: str) -> ModeldError:
    return Unavailable(
        grpc.StatusCode.UNAVAILABLE,
        f"the RouteStream to {addr} ended; the next call opens a new one",
    )


class AsyncRouteStream:
    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...], addr: str) -> None:
        self._stub = stub
        self._metadata = metadata
        self._addr = addr
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[pb.RouteStreamResponse]] = {}
        self._ids = itertools.count(1)
        self._writing = asyncio.Lock()

    async def call(self, method: str, request: Any, limit_s: float) -> Any:
        call = self._open()
        call_id = next(self._ids)
        answer = self._pending[call_id] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(limit_s):
                async with self._writing:
                    await call.write(request_for(call_id, method, request))
                return result_of(await answer)
        except TimeoutError:
            raise DeadlineExceeded(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {limit_s:g} s"
            ) from None
        except grpc.RpcError as exc:
            raise from_rpc(exc, self._addr) from exc
        except asyncio.InvalidStateError:
            # Written after the stream ended without an error status.
            raise ended(self._addr) from None
        finally:
            self._pending.pop(call_id, None)

    def _open(self) -> Any:
        if self._call is None:
            self._call = self._stub.RouteStream(metadata=self._metadata)
            self._reader = asyncio.create_task(self._read(self._call))
        return self._call

    async def _read(self, call: Any) -> None:
        error: ModeldError = ended(self._addr)
        try:
            async for answer in call:
                waiter = self._pending.pop(answer.id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(answer)
                elif (release := orphan_release(answer)) is not None:
                    async with self._writing:
                        await call.write(request_for(next(self._ids), "Release", release))
        except grpc.RpcError as exc:
            error = from_rpc(exc, self._addr)
        finally:
            if self._call is call:
                self._call = None
            for waiter in self._pending.values():
                if not waiter.done():
                    waiter.set_exception(error)

    async def close(self) -> None:
        call, reader = self._call, self._reader
        self._call = None
        if call is not None:
            call.cancel()
        if reader is not None:
            await asyncio.gather(reader, return_exceptions=True)


_END = object()


class SyncRouteStream:
    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...], addr: str) -> None:
        self._stub = stub
        self._metadata = metadata
        self._addr = addr
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue[Any] | None = None
        self._call: Any = None
        self._pending: dict[int, concurrent.futures.Future[pb.RouteStreamResponse]] = {}
        self._ids = itertools.count(1)

    def call(self, method: str, request: Any, limit_s: float) -> Any:
        call_id = next(self._ids)
        # Waiting before the stream is chosen: a reader that ends after this fails it.
        answer = self._pending[call_id] = concurrent.futures.Future()
        try:
            self._open().put(request_for(call_id, method, request))
            return result_of(answer.result(limit_s))
        except concurrent.futures.TimeoutError:
            raise DeadlineExceeded(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {limit_s:g} s"
            ) from None
        finally:
            self._pending.pop(call_id, None)

    def _open(self) -> "queue.SimpleQueue[Any]":
        with self._lock:
            if self._requests is None:
                requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
                self._call = self._stub.RouteStream(_drain(requests), metadata=self._metadata)
                self._requests = requests
                thread = threading.Thread(
                    target=self._read, args=(self._call, requests), daemon=True
                )
                thread.name = "modeld-route-stream"
                thread.start()
            return self._requests

    def _read(self, call: Any, requests: "queue.SimpleQueue[Any]") -> None:
        error: ModeldError = ended(self._addr)
        try:
            for answer in call:
                waiter = self._pending.pop(answer.id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(answer)
                elif (release := orphan_release(answer)) is not None:
                    requests.put(request_for(next(self._ids), "Release", release))
        except grpc.RpcError as exc:
            error = from_rpc(exc, self._addr)
        finally:
            with self._lock:
                if self._requests is requests:
                    self._requests = None
            requests.put(_END)
            for waiter in list(self._pending.values()):
                if not waiter.done():
                    waiter.set_exception(error)

    def close(self) -> None:
        with self._lock:
            requests, call = self._requests, self._call
            self._requests = None
        if requests is not None:
            requests.put(_END)
            call.cancel()


def _drain(requests: "queue.SimpleQueue[Any]") -> Iterator[pb.RouteStreamRequest]:
    while (request := requests.get()) is not _END:
        yield request
