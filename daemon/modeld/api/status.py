"""The one place where domain errors become gRPC status codes.

Every servicer method is wrapped by `unary` or `stream`: they bind a request id,
log one canonical line per RPC, and turn a domain error into its status. An
unexpected exception is logged with its traceback and reported as UNAVAILABLE
with the request id, so a client never sees INTERNAL or a traceback. Request
bytes that do not parse arrive as `Malformed` (see `convert.lenient`) and are
refused with INVALID_ARGUMENT here, like any other bad request.
"""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar

import grpc
import structlog

from modeld import errors
from modeld.api.convert import Malformed

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


def status_of(exc: errors.ModeldError) -> grpc.StatusCode:
    for kind in type(exc).__mro__:
        if kind in CODES:
            return CODES[kind]
    return grpc.StatusCode.UNAVAILABLE


@dataclass(frozen=True)
class _Rpc:
    method: str
    request_id: str
    # Read while the call is alive: the context of a finished (e.g. cancelled) call
    # must not be touched, and peer() on one was seen to crash the process (SIGSEGV).
    peer: str
    started: float


def _begin(method: str, context: Ctx) -> _Rpc:
    request_id = uuid.uuid4().hex[:16]
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id, method=method)
    return _Rpc(method, request_id, context.peer(), time.perf_counter())


def _reply_for(exc: Exception, request_id: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, errors.ModeldError):
        code = status_of(exc)
        return code, str(exc) or code.name
    log.exception("rpc_unexpected_error")
    return (
        grpc.StatusCode.UNAVAILABLE,
        f"modeld hit an unexpected error (request {request_id}); see its log",
    )


def _check_parsed(request: object) -> None:
    if isinstance(request, Malformed):
        raise errors.InvalidArgument(
            f"the request is not a valid {request.type_name}: {request.error}"
        )


def _finish(rpc: _Rpc, code: str) -> None:
    log.debug(
        "rpc",
        method=rpc.method,
        peer=rpc.peer,
        code=code,
        duration_ms=round((time.perf_counter() - rpc.started) * 1000, 3),
    )


def unary(
    fn: Callable[[S, Req, Ctx], Awaitable[Resp]],
) -> Callable[[S, Req, Ctx], Awaitable[Resp]]:
    method = fn.__name__

    @wraps(fn)
    async def wrapper(self: S, request: Req, context: Ctx) -> Resp:
        rpc = _begin(method, context)
        code = "OK"
        try:
            _check_parsed(request)
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            code = "ABORTED"
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:
            status, message = _reply_for(exc, rpc.request_id)
            code = status.name
            await context.abort(status, message)
            raise
        finally:
            _finish(rpc, code)

    return wrapper


def stream(
    fn: Callable[[S, Req, Ctx], AsyncIterator[Resp]],
) -> Callable[[S, Req, Ctx], AsyncIterator[Resp]]:
    method = fn.__name__

    @wraps(fn)
    async def wrapper(self: S, request: Req, context: Ctx) -> AsyncIterator[Resp]:
        rpc = _begin(method, context)
        code = "OK"
        try:
            _check_parsed(request)
            async for item in fn(self, request, context):
                yield item
        except grpc.aio.AbortError:
            code = "ABORTED"
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # GeneratorExit: gRPC closed the stream because the client went away.
            code = "CANCELLED"
            raise
        except Exception as exc:
            status, message = _reply_for(exc, rpc.request_id)
            code = status.name
            await context.abort(status, message)
        finally:
            _finish(rpc, code)

    return wrapper


def deadline_of(context: Ctx, now: float, default: float) -> float:
    """The caller's deadline as a monotonic time, or now + default when it set none."""
    remaining: Any = context.time_remaining()
    if remaining is None:
        return now + default
    return now + max(float(remaining), 0.0)
