"""The errors `Client` and `AsyncClient` raise when modeld refuses or cannot be reached.

Each carries the gRPC `status` and the daemon's `message`, and is still a
`grpc.RpcError` with `code()` and `details()`, so code written against raw gRPC
errors keeps working:

    try:
        with client.lease("chat") as lease: ...
    except modeld.client.NotFound as exc:       # no such model
        print(exc.message)
    except modeld.client.ResourceExhausted:     # no room now; try later
        ...
"""

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import grpc

# How gRPC's client reports that it reached nobody, and why (TCP, or a unix socket path);
# only its own words count: a daemon's UNAVAILABLE may quote a backend saying "refused".
_UNREACHED = re.compile(r"^failed to connect to all addresses", re.IGNORECASE)
_NOBODY = {
    "connection refused": re.compile(r"connection refused", re.IGNORECASE),
    "no such socket": re.compile(r"no such file or directory", re.IGNORECASE),
}


class ModeldError(grpc.RpcError):
    """A call to modeld failed; `status` is the grpc.StatusCode, `message` the reason."""

    def __init__(
        self,
        status: grpc.StatusCode,
        message: str,
        trailing: tuple[tuple[str, str | bytes], ...] = (),
    ) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status
        self.message = message
        self._trailing = trailing

    def code(self) -> grpc.StatusCode:
        return self.status

    def details(self) -> str:
        return self.message

    def trailing_metadata(self) -> Any:
        """What modeld sent with the error (empty when no modeld answered): grpc's
        `(key, value)` pairs, typed as grpc.RpcError types them."""
        return self._trailing


class NotFound(ModeldError):
    """No such model, replica or lease."""


class InvalidArgument(ModeldError):
    """The request itself is wrong (a bad name or value); retrying cannot help."""


class FailedPrecondition(ModeldError):
    """The request cannot be met in this state (e.g. more replicas than max_replicas)."""


class ResourceExhausted(ModeldError):
    """No room now (memory, GPUs, lease limits); a later try may succeed."""


class Unavailable(ModeldError):
    """modeld or the model's backend cannot be reached, or the model failed to start."""


class DeadlineExceeded(ModeldError):
    """The call (e.g. a cold start) did not finish within the client's timeout."""


class PermissionDenied(ModeldError):
    """The token is missing, wrong, or not allowed this call."""


_BY_STATUS: dict[grpc.StatusCode, type[ModeldError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDenied,
}


def from_rpc(exc: grpc.RpcError, addr: str) -> ModeldError:
    """The typed error for a failed call to the modeld at `addr`."""
    if isinstance(exc, ModeldError):
        return exc
    # Every RpcError grpc raises is also a grpc.Call; the stubs do not say so.
    call: Any = exc
    status = call.code() if hasattr(call, "code") else None
    details = call.details() if hasattr(call, "details") else None
    message = " | ".join(line.strip() for line in (details or str(exc)).splitlines() if line)
    trailing = tuple(call.trailing_metadata() or ()) if hasattr(call, "trailing_metadata") else ()
    if status is None:
        return ModeldError(grpc.StatusCode.UNKNOWN, message, trailing)
    if status is grpc.StatusCode.UNAVAILABLE:
        message = nobody_answers(addr, message) or message
    return _BY_STATUS.get(status, ModeldError)(status, message, trailing)


@contextlib.contextmanager
def typed(addr: str) -> Iterator[None]:
    """Around a unary call to the modeld at `addr`: its failure raised as `from_rpc`'s."""
    try:
        yield
    except grpc.RpcError as exc:
        raise from_rpc(exc, addr) from exc


def nobody_answers(addr: str, details: str) -> str | None:
    """What to do when gRPC's `details` say that nothing listens at `addr`; else None."""
    why = next((name for name, seen in _NOBODY.items() if seen.search(details)), None)
    if why is None or not _UNREACHED.search(details):
        return None
    return (
        f"no modeld answers at {addr} ({why}); is it running? Start it with `modeld serve` "
        "(`make run` in a checkout), or see `systemctl status modeld`"
    )


def from_stream_error(code: str, message: str) -> ModeldError:
    """The typed error for a RouteStream answer's StreamError (a status name and text)."""
    status = grpc.StatusCode.__members__.get(code, grpc.StatusCode.UNKNOWN)
    return _BY_STATUS.get(status, ModeldError)(status, message)
