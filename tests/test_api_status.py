"""api/status.py: unary and stream handlers report every outcome through one path."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import structlog

from modeld import errors
from modeld.api.convert import Malformed
from modeld.api.status import stream, unary


class FakeContext:
    """What the wrappers use of a grpc.aio.ServicerContext."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self.trailing: tuple[tuple[str, str], ...] = ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def abort(
        self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.aborted = (code, details)
        self.trailing = trailing
        raise grpc.aio.AbortError()


class Servicer:
    def __init__(self, fail: BaseException | None) -> None:
        self.fail = fail

    @unary
    async def Get(self, request: object, context: Any) -> str:
        if self.fail is not None:
            raise self.fail
        return "reply"

    @stream
    async def Follow(self, request: object, context: Any) -> AsyncIterator[str]:
        yield "first"
        if self.fail is not None:
            raise self.fail
        yield "second"


async def call_unary(servicer: Servicer, request: object, context: FakeContext) -> list[str]:
    return [await servicer.Get(request, context)]


async def call_stream(servicer: Servicer, request: object, context: FakeContext) -> list[str]:
    return [item async for item in servicer.Follow(request, context)]


CALLS = [call_unary, call_stream]
Call = Callable[[Servicer, object, FakeContext], Awaitable[list[str]]]


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize(
    ("fail", "code"),
    [
        (errors.NotFound("no model 'x'"), grpc.StatusCode.NOT_FOUND),
        (errors.InvalidArgument("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ResourceExhausted("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unavailable("later"), grpc.StatusCode.UNAVAILABLE),
        (errors.RetryRoute("lost a race"), grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.FailedPrecondition("not now"), grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
async def test_a_domain_error_is_its_status_with_its_message(
    call: Call, fail: errors.ModeldError, code: grpc.StatusCode
) -> None:
    context = FakeContext()
    with structlog.testing.capture_logs() as logged, pytest.raises(grpc.aio.AbortError):
        await call(Servicer(fail), object(), context)
    assert context.aborted == (code, str(fail))
    assert [e["code"] for e in logged if e["event"] == "rpc"] == [code.name]
    # The client retries only what modeld says a retry may win (client/rules.py).
    retry = "yes" if isinstance(fail, errors.RetryRoute) else "no"
    assert context.trailing == ((errors.RETRY_KEY, retry),)


@pytest.mark.parametrize("call", CALLS)
async def test_an_unexpected_error_is_unavailable_naming_the_request(call: Call) -> None:
    context = FakeContext()
    with (
        structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]
        ) as logged,
        pytest.raises(grpc.aio.AbortError),
    ):
        await call(Servicer(KeyError("bug")), object(), context)
    assert context.aborted is not None
    code, details = context.aborted
    [crash] = [e for e in logged if e["event"] == "rpc_unexpected_error"]
    assert code == grpc.StatusCode.UNAVAILABLE
    assert f"request {crash['request_id']}" in details and "KeyError" not in details
    assert [e["code"] for e in logged if e["event"] == "rpc"] == ["UNAVAILABLE"]


@pytest.mark.parametrize("call", CALLS)
async def test_request_bytes_that_did_not_parse_are_invalid_argument(call: Call) -> None:
    context = FakeContext()
    with pytest.raises(grpc.aio.AbortError):
        await call(Servicer(None), Malformed("RouteRequest", "truncated"), context)
    assert context.aborted is not None
    assert context.aborted[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid RouteRequest: truncated" in context.aborted[1]


@pytest.mark.parametrize("call", CALLS)
async def test_a_cancelled_call_is_logged_cancelled_and_not_aborted(call: Call) -> None:
    context = FakeContext()
    with structlog.testing.capture_logs() as logged, pytest.raises(asyncio.CancelledError):
        await call(Servicer(asyncio.CancelledError()), object(), context)
    assert context.aborted is None
    assert [e["code"] for e in logged if e["event"] == "rpc"] == ["CANCELLED"]


async def test_a_stream_closed_by_its_client_is_logged_cancelled() -> None:
    context = FakeContext()
    with structlog.testing.capture_logs() as logged:
        items = Servicer(None).Follow(object(), context)
        assert await anext(items) == "first"
        await items.aclose()
    assert context.aborted is None
    assert [e["code"] for e in logged if e["event"] == "rpc"] == ["CANCELLED"]


@pytest.mark.parametrize("call", CALLS)
async def test_a_good_call_is_logged_ok(call: Call) -> None:
    context = FakeContext()
    with structlog.testing.capture_logs() as logged:
        assert await call(Servicer(None), object(), context)
    assert context.aborted is None
    assert [e["code"] for e in logged if e["event"] == "rpc"] == ["OK"]
