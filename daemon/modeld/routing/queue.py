"""The fair queue: Routes that find every replica of a model at `parallel` wait here.

`RouteQueues` owns one FIFO per model and is the only code that adds, removes or
serves its waiters. A slot that frees goes to the oldest waiter of its model in the
same loop turn as the release that freed it (a hand-off): a Route that arrives
meanwhile finds the queue non-empty and joins its back instead of taking the slot
(no barging). The queues are served whenever capacity may have changed (the
capacity signal: a lease ended, a replica became READY or stopped, a setting
changed), and right after each Route joins, so a slot is never left free while
someone waits for it.

A waiter that leaves (its deadline, a cancelled call) leaves no trace: it is taken
out of its queue, and a lease handed to it in the same turn is released at once
(to the next waiter). While Routes wait, the lifecycle is asked for one more
replica (policy/capacity.py decides; admission has the last word). A queue waits
only on READY replicas, whose leases end (released or expired) and free a slot:
once none is left (crashed, stopping), its waiters are woken empty-handed and
route again, joining a start under way or beginning one.
"""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from modeld.clock import Clock
from modeld.errors import DeadlineExceeded, NotFound, ResourceExhausted
from modeld.info import QueueInfo
from modeld.ops.metrics import Metrics
from modeld.routing.index import ReplicaIndex
from modeld.routing.leases import Lease, LeaseService
from modeld.routing.pool import ModelPool
from modeld.routing.routed import RoutedReplica
from modeld.spec import ModelSpec
from modeld.storage.catalog import Catalog

log = structlog.get_logger(__name__)

# A waiter gives up this much before its deadline (at most this share of its wait), so
# that its DEADLINE_EXCEEDED, which says why, reaches the caller before the caller's own.
REPLY_MARGIN_S = 0.5
REPLY_MARGIN_SHARE = 0.2

Pick = Callable[[ModelPool, ModelSpec], RoutedReplica | None]
Grant = Callable[[RoutedReplica, ModelSpec], Lease | None]
ScaleOut = Callable[[ModelPool, ModelSpec, int], None]


@dataclass(eq=False, slots=True)
class Waiter:
    since: float  # monotonic
    # A lease handed to it, or None: route again (nothing can serve the queue any more).
    answer: "asyncio.Future[Lease | None]"


class WaitQueue:
    """One model's waiters, oldest first (a dict: ordered, O(1) removal)."""

    def __init__(self) -> None:
        self._waiters: dict[Waiter, None] = {}

    def __len__(self) -> int:
        return len(self._waiters)

    def join(self, waiter: Waiter) -> int:
        """Add a waiter at the back; its 1-based position."""
        self._waiters[waiter] = None
        return len(self._waiters)

    def leave(self, waiter: Waiter) -> int | None:
        """Take a waiter out; the position it had, or None when it was no longer queued."""
        if waiter not in self._waiters:
            return None
        position = list(self._waiters).index(waiter) + 1
        del self._waiters[waiter]
        return position

    def pop(self) -> Waiter:
        waiter = next(iter(self._waiters))
        del self._waiters[waiter]
        return waiter

    def drain(self) -> list[Waiter]:
        waiters = list(self._waiters)
        self._waiters.clear()
        return waiters

    def snapshot(self) -> list[Waiter]:
        return list(self._waiters)

    def oldest_since(self) -> float | None:
        return next(iter(self._waiters)).since if self._waiters else None


class RouteQueues:
    def __init__(
        self,
        *,
        clock: Clock,
        catalog: Catalog,
        index: ReplicaIndex,
        leases: LeaseService,
        pick: Pick,
        grant: Grant,
        scale_out: ScaleOut,
        metrics: Metrics | None = None,
    ) -> None:
        self._clock = clock
        self._catalog = catalog
        self._index = index
        self._leases = leases
        self._pick = pick
        self._grant = grant
        self._scale_out = scale_out
        self._metrics = metrics
        self._queues: dict[str, WaitQueue] = {}

    def waiting(self, model: str) -> int:
        queue = self._queues.get(model)
        return len(queue) if queue is not None else 0

    def waiters(self, model: str) -> list[Waiter]:
        """A model's waiters, oldest first (a snapshot, for checks from outside)."""
        queue = self._queues.get(model)
        return queue.snapshot() if queue is not None else []

    async def wait(self, pool: ModelPool, spec: ModelSpec, deadline: float) -> Lease | None:
        """Wait for a slot on a replica of `pool`; None: route again."""
        queue = self._queues.setdefault(spec.name, WaitQueue())
        if len(queue) >= spec.queue_max:
            # Refused, but the shortage it met still asks for one more replica.
            self._scale_out(pool, spec, len(queue) + 1)
            raise ResourceExhausted(
                f"model {spec.name!r}: every replica holds parallel = {spec.parallel} leases "
                f"and {len(queue)} Routes already wait for a slot (queue_max = "
                f"{spec.queue_max}); retry later, or raise parallel, max_replicas or queue_max"
            )
        now = self._clock.monotonic()
        remaining = deadline - now
        if remaining <= 0:
            raise DeadlineExceeded(f"deadline passed before model {spec.name!r} had a free slot")
        waiter = Waiter(now, asyncio.get_running_loop().create_future())
        position = queue.join(waiter)
        log.debug("route_queued", model=spec.name, position=position, parallel=spec.parallel)
        self.serve(spec.name)
        margin = min(REPLY_MARGIN_S, REPLY_MARGIN_SHARE * remaining)
        try:
            # Not wait_for: on 3.11 it swallows a cancellation that meets an answer, and
            # a cancelled call would keep a lease its client never sees.
            async with asyncio.timeout(remaining - margin):
                return await asyncio.shield(waiter.answer)
        except TimeoutError:
            position_then = queue.leave(waiter)
            if position_then is None:
                # Answered in the very turn its time ran out: the slot is its own.
                return waiter.answer.result()
            raise self._late(spec, waiter, position_then, len(queue) + 1) from None
        except BaseException:
            self._abandon(queue, waiter, spec.name)
            raise
        finally:
            if self._metrics is not None:
                self._metrics.queue_wait(spec.name, self._clock.monotonic() - waiter.since)

    def _late(self, spec: ModelSpec, waiter: Waiter, position: int, of: int) -> DeadlineExceeded:
        waited = self._clock.monotonic() - waiter.since
        log.info("route_queue_timeout", model=spec.name, position=position, waited_s=waited)
        return DeadlineExceeded(
            f"model {spec.name!r}: every replica held parallel = {spec.parallel} leases "
            f"(max_replicas = {spec.max_replicas}); this Route waited {waited:.1f}s at "
            f"position {position} of {of} in the model's queue and its deadline passed"
        )

    def _abandon(self, queue: WaitQueue, waiter: Waiter, model: str) -> None:
        """A waiter that gave up: out of the queue, and any lease handed to it released."""
        position = queue.leave(waiter)
        if position is None and waiter.answer.done() and not waiter.answer.cancelled():
            lease = waiter.answer.result()
            if lease is not None:
                self._leases.release(lease.id)
        log.info("route_queue_left", model=model, position=position)

    def serve_all(self) -> None:
        """Capacity may have changed: hand free slots to waiters (the signal's listener)."""
        for model in [m for m, q in self._queues.items() if q]:
            self.serve(model)

    def serve(self, model: str) -> None:
        queue = self._queues.get(model)
        pool = self._index.existing(model)
        if not queue or pool is None:
            return
        try:
            spec = self._catalog.get(model)
        except NotFound:
            self._wake(queue)
            return
        try:
            self._hand_off(queue, pool, spec)
        except ResourceExhausted:
            # The daemon-wide lease bound: a later release serves the queue.
            return
        if not queue:
            return
        if not pool.ready():
            # No lease will end here to free a slot: route again (and join or begin a start).
            self._wake(queue)
            return
        self._scale_out(pool, spec, len(queue))

    def _hand_off(self, queue: WaitQueue, pool: ModelPool, spec: ModelSpec) -> None:
        while queue:
            replica = self._pick(pool, spec)
            lease = self._grant(replica, spec) if replica is not None else None
            if lease is None:
                return
            queue.pop().answer.set_result(lease)

    def _wake(self, queue: WaitQueue) -> None:
        for waiter in queue.drain():
            waiter.answer.set_result(None)

    def infos(self, model: str | None) -> list[QueueInfo]:
        specs = [self._catalog.get(model)] if model else self._catalog.list()
        now = self._clock.monotonic()
        out = []
        for spec in specs:
            if not spec.parallel:
                continue
            queue = self._queues.get(spec.name) or WaitQueue()
            since = queue.oldest_since()
            wait = now - since if since is not None else 0.0
            out.append(QueueInfo(spec.name, len(queue), spec.parallel, spec.queue_max, wait))
        return out

    def lengths(self) -> dict[str, int]:
        """Waiters per model (the metrics' gauge, read at scrape time)."""
        return {model: len(queue) for model, queue in self._queues.items()}
