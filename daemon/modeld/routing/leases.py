"""The lease table: who holds which in-flight slot, and when each slot expires.

Owned by the router. Expiry uses a heap with lazy deletion, so adding, renewing
and releasing are O(log n) and finding what expired is cheap.
"""

import heapq
from dataclasses import dataclass
from typing import Protocol


class LeaseHolder(Protocol):
    """What a lease needs from its replica: give the slot back exactly once."""

    @property
    def id(self) -> str: ...

    def release(self) -> None: ...


@dataclass(slots=True)
class Lease:
    id: str
    replica: LeaseHolder
    model: str
    address: str
    protocol: str
    started: float  # monotonic
    expires: float  # monotonic
    expires_wall: float
    ttl: float
    cold_start: bool

    @property
    def replica_id(self) -> str:
        return self.replica.id


class LeaseTable:
    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._leases)

    def add(self, lease: Lease) -> None:
        self._leases[lease.id] = lease
        heapq.heappush(self._heap, (lease.expires, lease.id))

    def get(self, lease_id: str) -> Lease | None:
        return self._leases.get(lease_id)

    def pop(self, lease_id: str) -> Lease | None:
        """Remove a lease; None when it was already released or expired."""
        lease = self._leases.pop(lease_id, None)
        self._compact()
        return lease

    def renew(self, lease: Lease, now: float, wall: float) -> None:
        lease.expires = now + lease.ttl
        lease.expires_wall = wall + lease.ttl
        heapq.heappush(self._heap, (lease.expires, lease.id))

    def pop_expired(self, now: float) -> list[Lease]:
        expired = []
        while self._heap and self._heap[0][0] <= now:
            at, lease_id = heapq.heappop(self._heap)
            lease = self._leases.get(lease_id)
            if lease is not None and lease.expires == at:
                del self._leases[lease_id]
                expired.append(lease)
        self._compact()
        return expired

    def next_expiry(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def of_replica(self, replica_id: str) -> list[Lease]:
        return [lease for lease in self._leases.values() if lease.replica.id == replica_id]

    def oldest_started(self) -> dict[str, float]:
        """Per replica id, the start of its oldest active lease (busy-timeout input)."""
        oldest: dict[str, float] = {}
        for lease in self._leases.values():
            rid = lease.replica.id
            if rid not in oldest or lease.started < oldest[rid]:
                oldest[rid] = lease.started
        return oldest

    def _compact(self) -> None:
        # Renewals and releases leave stale heap entries; rebuild when they dominate.
        if len(self._heap) > 64 and len(self._heap) > 4 * len(self._leases):
            self._heap = [(lease.expires, lease.id) for lease in self._leases.values()]
            heapq.heapify(self._heap)
