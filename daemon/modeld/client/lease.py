"""A lease as the client holds it, and how the body of a `with` block reports on it."""

import threading
from dataclasses import dataclass, field

import grpc

from modeld._proto.modeld.v1 import modeld_pb2 as pb


class BackendUnreachable(Exception):
    """Raised out of a lease block: the backend at the lease's address could not be reached.

    The lease is released with outcome BACKEND_UNREACHABLE, so the daemon probes
    that replica at once and replaces it if it is dead.
    """


class BackendFailed(Exception):
    """Raised out of a lease block: the backend answered, but with an error."""


@dataclass
class Lease:
    """One in-flight slot on one replica: send the inference request to `address`."""

    lease_id: str
    replica_id: str
    address: str
    protocol: str  # "grpc" (LocalAI backend protocol) or "http"
    cold_start: bool
    expires_at: float  # the daemon's wall clock, seconds since the epoch
    # In a cluster: the modeld that granted the lease, which Release and RenewLease
    # go to directly (one hop fewer than through the modeld that forwarded the Route).
    owner_address: str = ""
    outcome: pb.ReleaseOutcome = pb.OK
    # Set when a renewal found the lease gone (expired or released elsewhere).
    lost: grpc.RpcError | None = None
    renewals: int = 0
    _changed: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def unreachable(self, cause: BaseException | None = None) -> BackendUnreachable:
        """Mark the lease BACKEND_UNREACHABLE; raise what this returns to leave the block."""
        self.outcome = pb.BACKEND_UNREACHABLE
        error = BackendUnreachable(f"backend at {self.address} is unreachable: {cause}")
        error.__cause__ = cause
        return error

    def failed(self, cause: BaseException | None = None) -> BackendFailed:
        """Mark the lease BACKEND_ERROR; raise what this returns to leave the block."""
        self.outcome = pb.BACKEND_ERROR
        error = BackendFailed(f"backend at {self.address} failed: {cause}")
        error.__cause__ = cause
        return error

    def wait_renewals(self, count: int, timeout: float | None = None) -> bool:
        """Block until the lease was renewed `count` times in all (False on timeout or loss)."""
        with self._changed:
            self._changed.wait_for(lambda: self.renewals >= count or self.lost, timeout)
            return self.renewals >= count

    def _renewed(self, expires_at: float) -> None:
        with self._changed:
            self.expires_at = expires_at
            self.renewals += 1
            self._changed.notify_all()

    def _lose(self, error: grpc.RpcError) -> None:
        with self._changed:
            self.lost = error
            self._changed.notify_all()
