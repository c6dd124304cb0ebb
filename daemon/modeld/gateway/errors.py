"""What the gateway answers when it cannot serve: OpenAI-style error JSON, in one place.

Every refusal is an `ApiError`: the HTTP status, the body
`{"error": {"message", "type", "param", "code"}}` that OpenAI's SDKs parse, and
headers such as `Retry-After`. modeld's gRPC statuses are mapped here and nowhere else.
"""

import json
import math
from dataclasses import dataclass, field

import grpc
from aiohttp import web

from modeld.client.errors import ModeldError

INVALID = "invalid_request_error"
SERVER = "server_error"


@dataclass
class ApiError(Exception):
    status: int
    message: str
    type: str = INVALID
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {"message": self.message, "type": self.type, "param": None, "code": self.code}
        }

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)

    def event(self) -> bytes:
        """The error as the last server-sent event of a stream that broke off."""
        return b"data: " + json.dumps(self.body()).encode() + b"\n\n"


def retry_after(seconds: float) -> dict[str, str]:
    # Retry-After is whole seconds; never 0, which clients read as "at once, forever".
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def bad_request(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, INVALID, code)


def from_modeld(error: ModeldError, model: str, wait: float) -> ApiError:
    """modeld's refusal of a Route for `model`; `wait` is the Retry-After for busy answers."""
    status, message = error.status, error.message
    if status is grpc.StatusCode.NOT_FOUND:
        return ApiError(404, message, INVALID, "model_not_found")
    if status is grpc.StatusCode.INVALID_ARGUMENT:
        return bad_request(message)
    if status is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ApiError(
            429, message, "rate_limit_exceeded", "rate_limit_exceeded", retry_after(wait)
        )
    if status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION):
        return ApiError(503, message, SERVER, "model_unavailable", retry_after(wait))
    if status is grpc.StatusCode.DEADLINE_EXCEEDED:
        return ApiError(504, f"model {model!r}: {message}", SERVER, "timeout")
    if status in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        # The gateway's own credentials to modeld are wrong: the operator's to fix, and
        # nothing about them is repeated to the client.
        return ApiError(
            502,
            "the gateway may not use modeld; see the gateway's log",
            SERVER,
            "gateway_misconfigured",
        )
    return ApiError(502, f"modeld failed: {status.name}: {message}", SERVER, "upstream_error")


def unreachable(model: str, tries: int) -> ApiError:
    return ApiError(
        502,
        f"model {model!r}: no replica could be reached ({tries} tried); try again",
        SERVER,
        "backend_unreachable",
    )


def broken_stream(model: str, why: str) -> ApiError:
    return ApiError(
        502, f"model {model!r}: the backend's answer broke off: {why}", SERVER, "backend_error"
    )


def wrong_protocol(model: str, protocol: str) -> ApiError:
    return bad_request(
        f"model {model!r} is served by a backend of protocol {protocol!r} (LocalAI's gRPC "
        "backend protocol), which speaks no HTTP; the gateway serves models of protocol "
        "'http' only. Call it through modeld's Route and the backend's gRPC API instead",
        "unsupported_protocol",
    )


def http_error(exc: web.HTTPException) -> ApiError:
    """aiohttp's own refusals (no such path, body too large, wrong method) in the same JSON."""
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
    return ApiError(exc.status, exc.reason, INVALID, code)
