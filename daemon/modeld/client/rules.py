"""What both clients decide about calls and leases: pure functions of replies, errors and `now`.

`Client` (a thread renews) and `AsyncClient` (a task renews) build their requests,
choose the release outcome, time renewals and decide on retries here; they
differ only in how they wait. Nothing here reads a clock or does I/O.
"""

import contextlib
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import grpc

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.client.lease import BackendFailed, BackendUnreachable, Lease
from modeld.errors import RETRY_KEY

DEFAULT_TIMEOUT = 300.0
# Renew when a third of the remaining time is gone: two more tries before expiry.
RENEW_FRACTION = 1 / 3
MIN_RENEW_INTERVAL = 0.05


def route_request(model: str, affinity_key: str = "") -> pb.RouteRequest:
    return pb.RouteRequest(model=model, affinity_key=affinity_key)


def release_request(lease: Lease, outcome: pb.ReleaseOutcome | None) -> pb.ReleaseRequest:
    return pb.ReleaseRequest(
        lease_id=lease.lease_id, outcome=lease.outcome if outcome is None else outcome
    )


def renew_request(lease: Lease) -> pb.RenewLeaseRequest:
    return pb.RenewLeaseRequest(lease_id=lease.lease_id)


def lease_of(reply: Any) -> Lease:
    """The lease a Route reply grants."""
    return Lease(
        lease_id=reply.lease_id,
        replica_id=reply.replica_id,
        address=reply.address,
        protocol=pb.Protocol.Name(reply.protocol).lower(),
        cold_start=reply.cold_start,
        expires_at=expiry_of(reply),
        owner_address=reply.owner_address,
    )


def owner_target(lease: Lease, connected_to: str) -> str | None:
    """Where a lease's Release and RenewLease go directly: its owner, when that is a
    modeld other than the one this client is connected to (else None: the usual one)."""
    owner = lease.owner_address
    return owner if owner and owner != connected_to else None


def try_connected(error: grpc.RpcError) -> bool:
    """An owner this client cannot reach is asked through the connected modeld,
    which forwards to it; any other answer is the owner's own and final."""
    return error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)


def expiry_of(reply: Any) -> float:
    """A Route or RenewLease reply's lease expiry: the daemon's wall clock, in seconds."""
    return float(reply.lease_expires_at.ToNanoseconds() / 1e9)


def deadline_for(now: float, timeout: float, limit: float | None = None) -> float:
    """A call's deadline (monotonic): the client's timeout, or a shorter `limit`."""
    return now + (timeout if limit is None else limit)


def call_timeout(deadline: float, now: float) -> float:
    return max(0.0, deadline - now)


def status_code(error: grpc.RpcError) -> grpc.StatusCode | None:
    # Every RpcError grpc raises is also a grpc.Call; the stubs do not say so.
    call: Any = error
    return call.code() if hasattr(call, "code") else None


def retry_pause(
    error: grpc.RpcError, retry_delay: float, deadline: float, now: float
) -> float | None:
    """Seconds to pause before the one retry of a Route, or None: the error is final.

    Only an UNAVAILABLE that no modeld answered (it was unreachable or restarting) is
    retried, or one modeld answered saying a retry may win (a race it lost). Any other
    UNAVAILABLE is modeld's verdict, e.g. a start that failed, which a retry would
    only run again. The pause never outlasts the deadline.
    """
    if status_code(error) is not grpc.StatusCode.UNAVAILABLE:
        return None
    if retry_advice(error) not in (None, "yes"):
        return None
    return max(0.0, min(retry_delay, deadline - now))


def retry_advice(error: grpc.RpcError) -> str | None:
    """modeld's `RETRY_KEY` trailer on the error; None when no modeld answered."""
    call: Any = error
    trailing = call.trailing_metadata() if hasattr(call, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == RETRY_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def time_left(expires_at: float, wall_now: float) -> float:
    """Seconds until the lease expires (by this host's clock), at least a moment."""
    return max(MIN_RENEW_INTERVAL, expires_at - wall_now)


def renew_interval(expires_at: float, wall_now: float) -> float:
    return max(MIN_RENEW_INTERVAL, time_left(expires_at, wall_now) * RENEW_FRACTION)


def renewal_over(error: grpc.RpcError, expires_at: float, wall_now: float) -> bool:
    """Whether a failed renewal ends renewing: the lease is gone, or past its expiry."""
    return status_code(error) is grpc.StatusCode.NOT_FOUND or wall_now >= expires_at


def outcome_of(
    lease: Lease, error: BaseException | None, unreachable_on: tuple[type, ...]
) -> pb.ReleaseOutcome:
    """The outcome a lease block's exit releases with: what it raised, else what it marked."""
    if isinstance(error, BackendUnreachable) or (
        unreachable_on and isinstance(error, unreachable_on)
    ):
        return pb.BACKEND_UNREACHABLE
    if isinstance(error, BackendFailed):
        return pb.BACKEND_ERROR
    return lease.outcome


def escalated(
    error: BaseException, lease: Lease, unreachable_on: tuple[type, ...]
) -> BaseException:
    """What a lease block that raised `error` raises: a `BackendUnreachable` (marking the
    lease so) for an exception of a type in `unreachable_on`, else `error` itself."""
    listed = bool(unreachable_on) and isinstance(error, unreachable_on)
    if listed and not isinstance(error, BackendUnreachable):
        return lease.unreachable(error)
    return error


def release_failed(lease: Lease, failure: grpc.RpcError, error: BaseException | None) -> None:
    """A block's release failed: raise that, unless the block raised (then note it there)."""
    if error is None:
        raise failure
    error.add_note(f"and releasing lease {lease.lease_id} failed too: {failure}")


class LeaseBlock:
    """The body of one lease block, for either client: `with` it around the body, then
    release the lease with `outcome` inside `releasing()`.

    It escalates what the body raises (`escalated`) and remembers it, so that the
    release's outcome and a failed release's report both follow the body's exit.
    """

    def __init__(self, lease: Lease, unreachable_on: tuple[type, ...]) -> None:
        self.lease = lease
        self._unreachable_on = unreachable_on
        self._error: BaseException | None = None

    def __enter__(self) -> Lease:
        return self.lease

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if error is None:
            return
        self._error = escalated(error, self.lease, self._unreachable_on)
        if self._error is not error:
            raise self._error from error

    @property
    def outcome(self) -> pb.ReleaseOutcome:
        return outcome_of(self.lease, self._error, self._unreachable_on)

    @contextlib.contextmanager
    def releasing(self) -> Iterator[None]:
        """Around the release call: its failure as `release_failed` says."""
        try:
            yield
        except grpc.RpcError as failure:
            release_failed(self.lease, failure, self._error)
