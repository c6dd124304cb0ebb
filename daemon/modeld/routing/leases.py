"""The lease service: the only owner of leases, their expiry and their bounds.

A lease is one in-flight slot on one replica. `grant` takes the slot from the
replica's `Slots` under the lease's id and `end` gives that same id back, and
nothing else takes or gives back slots: a replica's in-flight count is its
number of live leases by construction, and a double release is impossible (the
table pops a lease once) instead of being clamped away.

Expiry uses a heap with lazy deletion, so granting, renewing and releasing are
O(log n); one task sleeps until the earliest expiry. Lease expiry is published
on the bus as its own kind of event (observers only; nothing that must happen
depends on the bus).
"""

import asyncio
import contextlib
import heapq
import itertools
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from modeld.clock import Clock
from modeld.config import DEFAULT_MAX_LEASES, DEFAULT_MAX_LEASES_PER_REPLICA
from modeld.errors import NotFound, ResourceExhausted
from modeld.info import Grant
from modeld.ops.events import LEASE_EXPIRED, Event, EventBus
from modeld.ops.metrics import Metrics
from modeld.state import ReplicaState

log = structlog.get_logger(__name__)

# Lease ids: a random prefix per process (a lease of an earlier life is never taken
# for one of this life's) and a counter, 32 hex digits like the uuid4 they replace at
# a fraction of the cost. Like any lease id they are names, not secrets: a client
# that may Release may also Unload.
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count(1)


def new_lease_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


class LeaseHolder(Protocol):
    """What a lease needs from its replica: one slot, taken and given back by lease id."""

    @property
    def id(self) -> str: ...

    @property
    def model(self) -> str: ...

    @property
    def state(self) -> ReplicaState: ...

    @property
    def address(self) -> str: ...

    @property
    def protocol(self) -> str: ...

    @property
    def in_flight(self) -> int: ...

    def acquire(self, holder: str) -> bool: ...

    def release(self, holder: str) -> None: ...


@dataclass(frozen=True, slots=True)
class LeaseLimits:
    """Bounds on leases (config `[leases]`): past them a Route gets RESOURCE_EXHAUSTED."""

    per_replica: int = DEFAULT_MAX_LEASES_PER_REPLICA
    total: int = DEFAULT_MAX_LEASES


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

    def grant(self) -> Grant:
        return Grant(
            self.id,
            self.replica.id,
            self.address,
            self.protocol,
            self.expires_wall,
            self.cold_start,
        )


class LeaseTable:
    """Leases by id, by expiry (a heap) and per replica in start order.

    Per replica, leases sit in a dict in the order they started (a Route's lease
    starts now, so appending keeps the order; an older start is sorted in), so
    the oldest is the first: the busy-timeout input costs one step per replica
    with leases, not one per lease.
    """

    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}
        self._heap: list[tuple[float, str]] = []
        self._by_replica: dict[str, dict[str, Lease]] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def add(self, lease: Lease) -> None:
        self._leases[lease.id] = lease
        heapq.heappush(self._heap, (lease.expires, lease.id))
        held = self._by_replica.setdefault(lease.replica.id, {})
        newest = next(reversed(held.values()), None)
        held[lease.id] = lease
        if newest is not None and lease.started < newest.started:
            self._by_replica[lease.replica.id] = dict(
                sorted(held.items(), key=lambda item: item[1].started)
            )

    def get(self, lease_id: str) -> Lease | None:
        return self._leases.get(lease_id)

    def pop(self, lease_id: str) -> Lease | None:
        """Remove a lease; None when it was already released or expired."""
        lease = self._leases.pop(lease_id, None)
        if lease is not None:
            self._unlink(lease)
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
                self._unlink(lease)
                expired.append(lease)
        self._compact()
        return expired

    def next_expiry(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def of_replica(self, replica_id: str) -> list[Lease]:
        return list(self._by_replica.get(replica_id, {}).values())

    def per_replica(self) -> dict[str, int]:
        return {rid: len(held) for rid, held in self._by_replica.items()}

    def oldest_started(self) -> dict[str, float]:
        """Per replica id, the start of its oldest active lease (busy-timeout input)."""
        return {rid: next(iter(held.values())).started for rid, held in self._by_replica.items()}

    def _unlink(self, lease: Lease) -> None:
        held = self._by_replica[lease.replica.id]
        del held[lease.id]
        if not held:
            del self._by_replica[lease.replica.id]

    def _compact(self) -> None:
        # Renewals and releases leave stale heap entries; rebuild when they dominate.
        if len(self._heap) > 64 and len(self._heap) > 4 * len(self._leases):
            self._heap = [(lease.expires, lease.id) for lease in self._leases.values()]
            heapq.heapify(self._heap)


class LeaseService:
    def __init__(
        self,
        *,
        clock: Clock,
        events: EventBus,
        on_freed: Callable[[], None],
        limits: LeaseLimits | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._clock = clock
        self._events = events
        self._on_freed = on_freed
        self.limits = limits or LeaseLimits()
        self._metrics = metrics
        self._table = LeaseTable()
        self._wake = asyncio.Event()
        self._wake_at: float | None = None
        self.expired_total = 0

    def __len__(self) -> int:
        return len(self._table)

    def holds(self, lease_id: str) -> bool:
        return self._table.get(lease_id) is not None

    def room_on(self, replica: LeaseHolder) -> bool:
        return replica.in_flight < self.limits.per_replica

    def check_total(self) -> None:
        if len(self._table) >= self.limits.total:
            raise ResourceExhausted(
                f"{len(self._table)} leases are held, the most this daemon grants "
                f"(max_leases = {self.limits.total}); release or let some expire"
            )

    def full(self, model: str) -> ResourceExhausted:
        return ResourceExhausted(
            f"every ready replica of model {model!r} holds the most leases it may "
            f"(max_leases_per_replica = {self.limits.per_replica}); release some or add replicas"
        )

    def grant(self, replica: LeaseHolder, ttl: float, cold: bool) -> Lease | None:
        """A lease on `replica`, or None when it gives no slot (not READY, or stopping)."""
        self.check_total()
        if not self.room_on(replica):
            raise self.full(replica.model)
        now = self._clock.monotonic()
        lease = Lease(
            id=new_lease_id(),
            replica=replica,
            model=replica.model,
            address=replica.address,
            protocol=replica.protocol,
            started=now,
            expires=now + ttl,
            expires_wall=self._clock.wall() + ttl,
            ttl=ttl,
            cold_start=cold,
        )
        if not replica.acquire(lease.id):
            return None
        self._table.add(lease)
        if self._wake_at is None or lease.expires < self._wake_at:
            self._wake.set()
        return lease

    def release(self, lease_id: str) -> Lease | None:
        lease = self._table.pop(lease_id)
        if lease is not None:
            self._end(lease)
        return lease

    def renew(self, lease_id: str) -> float:
        lease = self._table.get(lease_id)
        if lease is None:
            raise NotFound(
                f"lease {lease_id[:64]!r} is not held: it was released or expired; Route again"
            )
        self._table.renew(lease, self._clock.monotonic(), self._clock.wall())
        return lease.expires_wall

    def drop(self, replica_id: str) -> int:
        """Expire every lease on a replica that is being stopped by force or has ended."""
        leases = [self._table.pop(lease.id) for lease in self._table.of_replica(replica_id)]
        for lease in leases:
            if lease is not None:
                self._end(lease)
                self._count_expired(1)
        return len(leases)

    def expire(self) -> int:
        expired = self._table.pop_expired(self._clock.monotonic())
        for lease in expired:
            self._end(lease)
            log.info(
                "lease_expired", lease_id=lease.id, replica_id=lease.replica_id, model=lease.model
            )
            state = lease.replica.state
            self._events.publish(
                Event(
                    self._clock.wall(),
                    lease.replica_id,
                    lease.model,
                    state,
                    state,
                    "lease_expired",
                    kind=LEASE_EXPIRED,
                )
            )
        self._count_expired(len(expired))
        return len(expired)

    async def run(self) -> None:
        """Expire leases as their time comes: one wait for the earliest expiry."""
        while True:
            self._wake_at = self._table.next_expiry()
            now = self._clock.monotonic()
            timeout = None if self._wake_at is None else max(self._wake_at - now, 0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            self.expire()

    def per_replica(self) -> dict[str, int]:
        return self._table.per_replica()

    def oldest_started(self) -> dict[str, float]:
        return self._table.oldest_started()

    def _end(self, lease: Lease) -> None:
        lease.replica.release(lease.id)
        self._on_freed()

    def _count_expired(self, n: int) -> None:
        if n:
            self.expired_total += n
            if self._metrics is not None:
                self._metrics.lease_expired(n)
