"""Stopping replicas, and hearing of every replica state change.

The one place a replica is asked to stop on the router's side (unload,
eviction, an unreachable backend, shutdown) and the one listener every replica
calls, synchronously, on each state change. What must happen when a replica
becomes READY, crashes or stops (its cached probe, the model's crash backoff,
pruning the pool, waking admission) happens here by direct call, never through
the lossy event bus, which only feeds observers.
"""

import asyncio

import structlog

from modeld.ops.metrics import Metrics
from modeld.policy.eviction import Eviction
from modeld.policy.view import ReplicaView
from modeld.routing.index import ReplicaIndex
from modeld.routing.judge import HealthJudge
from modeld.routing.leases import LeaseService
from modeld.routing.probe import ProbeCache
from modeld.routing.routed import RoutedReplica
from modeld.routing.signal import CapacitySignal
from modeld.state import LIVE, ReplicaState

log = structlog.get_logger(__name__)

S = ReplicaState
DEFAULT_DRAIN = 30.0
_CRASH_SOURCES = frozenset({S.READY, S.DRAINING})


class Stopper:
    """Also the evictor admission uses: views, the capacity event, and `evict`."""

    def __init__(
        self,
        *,
        index: ReplicaIndex,
        leases: LeaseService,
        prober: ProbeCache,
        judge: HealthJudge,
        signal: CapacitySignal,
        metrics: Metrics | None = None,
    ) -> None:
        self._index = index
        self._leases = leases
        self._prober = prober
        self._judge = judge
        self._signal = signal
        self._metrics = metrics

    async def stop(
        self,
        replica: RoutedReplica,
        reason: str,
        force: bool,
        drain: float | None,
        *,
        responsive: bool = True,
    ) -> None:
        if force:
            self._leases.drop(replica.id)
        await replica.stop(
            reason,
            force=force,
            drain_timeout=DEFAULT_DRAIN if drain is None else drain,
            responsive=responsive,
        )
        self._leases.drop(replica.id)
        self._prober.forget(replica.id)
        self._judge.forget(replica.id)
        self._index.pool(replica.model).prune()
        self._signal.changed()

    # the evictor side (admission and the watchdog)

    def views(self) -> list[ReplicaView]:
        return self._index.views()

    def capacity_event(self) -> asyncio.Event:
        return self._signal.event()

    async def evict(self, eviction: Eviction, force: bool) -> None:
        replica = self._index.find(eviction.replica_id)
        if replica is None or replica.state not in LIVE or (replica.stop_requested and not force):
            # Someone else (admission or the watchdog) is already stopping it.
            return
        log.info(
            "replica_evicted",
            replica_id=replica.id,
            model=replica.model,
            reason=eviction.reason,
            detail=eviction.detail,
        )
        if self._metrics is not None:
            self._metrics.evicted(eviction.reason)
        await self.stop(replica, eviction.reason, force, None)

    # every replica's listener

    def on_change(
        self, replica: RoutedReplica, old: ReplicaState, new: ReplicaState, reason: str
    ) -> None:
        if new is S.READY:
            # Readiness was a successful health probe: no need to probe again at once.
            self._prober.record_ok(replica.id)
            # A loading replica that admission waited on may now be evictable.
            self._signal.changed()
            return
        if old is S.READY:
            # Draining, stopping or crashed: no longer routed to, so no longer judged.
            self._judge.forget(replica.id)
        if new not in (S.FAILED, S.STOPPED):
            return
        self._signal.changed()
        self._prober.forget(replica.id)
        pool = self._index.existing(replica.model)
        if pool is None:
            return
        if new is S.FAILED and old in _CRASH_SOURCES:
            pool.note_crash(reason, replica.id)
        pool.prune()
