"""The one place where domain errors become gRPC status codes.

Every servicer method is wrapped by `unary` or `stream`; both run the call inside
one `_Rpc`, which binds a request id, logs one canonical line per RPC (at debug: a
warm call at info does no logging work), and turns a domain error into its status. An
unexpected exception is logged with its traceback and reported as UNAVAILABLE
with the request id, so a client never sees INTERNAL or a traceback. Request
bytes that do not parse arrive as `Malformed` (see `convert.lenient`) and are
refused with INVALID_ARGUMENT here, like any other bad request.
"""

import asyncio
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar

import grpc
import structlog

from modeld import errors
from modeld.api.convert import Malformed
from modeld.ops import logconfig

log = structlog.get_logger(__name__)

CODES: dict[type[errors.ModeldError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# The servicer context type, with the request/response parameters the stubs leave open.
Ctx = grpc.aio.ServicerContext[Any, Any]
S = TypeVar("S")
Req = TypeVar("Req")
Resp = TypeVar("Resp")


# Request ids: unique in this process and told apart from another life's by a random
# prefix, at the cost of a counter step (a uuid4 per call was a measurable share).
_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count(1)


def status_of(exc: errors.ModeldError) -> grpc.StatusCode:
    for kind in type(exc).__mro__:
        if kind in CODES:
            return CODES[kind]
    return grpc.StatusCode.UNAVAILABLE


class _Rpc:
    """One call from start to end: binds its request id, logs one canonical line when
    it ends, and is the only place an exception becomes a status (unary and stream).

    The wrappers call `ok` or `failed` (no async context manager: its two coroutines
    per call were a measurable share of a warm Route)."""

    __slots__ = ("_context", "_method", "_peer", "_started", "request_id")

    def __init__(self, method: str, context: Ctx) -> None:
        self.request_id = f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=self.request_id, method=method)
        self._method = method
        self._context = context
        # Read while the call is alive: the context of a finished (e.g. cancelled) call
        # must not be touched, and peer() on one was seen to crash the process (SIGSEGV).
        # Only the canonical line needs it, and an error's line may be written anyway.
        self._peer = context.peer() if logconfig.per_call_lines else ""
        self._started = time.perf_counter()

    def ok(self) -> None:
        if logconfig.per_call_lines:
            self._finish("OK")

    async def failed(self, exc: BaseException) -> None:
        """Log the outcome; a domain or unexpected error becomes the call's status
        (`abort` raises AbortError, which ends the call with it)."""
        code = _code_of(exc)
        try:
            if code is None and isinstance(exc, Exception):
                status, message = reply_for(exc, self.request_id)
                code = status.name
                retry = "yes" if isinstance(exc, errors.RetryRoute) else "no"
                # Raises AbortError, which ends the call with this status.
                await self._context.abort(status, message, ((errors.RETRY_KEY, retry),))
        finally:
            self._finish(code or "UNKNOWN")

    def _finish(self, code: str) -> None:
        log.debug(
            "rpc",
            method=self._method,
            peer=self._peer,
            code=code,
            duration_ms=round((time.perf_counter() - self._started) * 1000, 3),
        )


def _code_of(exc: BaseException | None) -> str | None:
    """The logged code of an outcome that needs no status of ours; None when it does."""
    if exc is None:
        return "OK"
    if isinstance(exc, grpc.aio.AbortError):
        return "ABORTED"
    # GeneratorExit: gRPC closed a stream because the client went away.
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    if not isinstance(exc, Exception):
        return type(exc).__name__
    return None


def reply_for(exc: Exception, request_id: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, errors.ModeldError):
        code = status_of(exc)
        return code, str(exc) or code.name
    log.exception("rpc_unexpected_error", exc_info=exc)
    return (
        grpc.StatusCode.UNAVAILABLE,
        f"modeld hit an unexpected error (request {request_id}); see its log",
    )


def _check_parsed(request: object) -> None:
    if isinstance(request, Malformed):
        raise errors.InvalidArgument(
            f"the request is not a valid {request.type_name}: {request.error}"
        )


def unary(
    fn: Callable[[S, Req, Ctx], Awaitable[Resp]],
) -> Callable[[S, Req, Ctx], Awaitable[Resp]]:
    method = fn.__name__

    @wraps(fn)
    async def wrapper(self: S, request: Req, context: Ctx) -> Resp:
        rpc = _Rpc(method, context)
        try:
            _check_parsed(request)
            reply = await fn(self, request, context)
        except BaseException as exc:
            await rpc.failed(exc)
            raise
        rpc.ok()
        return reply

    return wrapper


def bidi(
    fn: Callable[[S, AsyncIterator[Req], Ctx], Awaitable[None]],
) -> Callable[[S, AsyncIterator[Req], Ctx], Awaitable[None]]:
    """A bidirectional stream's handler, which reads its requests and writes its
    answers itself; a bad message is its to answer (it may not end the stream)."""
    method = fn.__name__

    @wraps(fn)
    async def wrapper(self: S, requests: AsyncIterator[Req], context: Ctx) -> None:
        rpc = _Rpc(method, context)
        try:
            await fn(self, requests, context)
        except BaseException as exc:
            await rpc.failed(exc)
            raise
        rpc.ok()

    return wrapper


def stream(
    fn: Callable[[S, Req, Ctx], AsyncIterator[Resp]],
) -> Callable[[S, Req, Ctx], AsyncIterator[Resp]]:
    method = fn.__name__

    @wraps(fn)
    async def wrapper(self: S, request: Req, context: Ctx) -> AsyncIterator[Resp]:
        rpc = _Rpc(method, context)
        try:
            _check_parsed(request)
            async for item in fn(self, request, context):
                yield item
        except BaseException as exc:
            await rpc.failed(exc)
            raise
        rpc.ok()

    return wrapper


def deadline_of(context: Ctx, now: float, default: float) -> float:
    """The caller's deadline as a monotonic time, or now + default when it set none."""
    remaining: Any = context.time_remaining()
    if remaining is None:
        return now + default
    return now + max(float(remaining), 0.0)
