"""Whether a READY replica that did not answer is dead, or only busy.

A server answering health from the queue its completions wait in takes seconds to
answer under load; stopping it then kills the very requests that made it slow. So a
replica is declared dead only on evidence: its process exited (the exit watch sees
that, not this), its port refuses connections, or `probe_failures` probes in a row
failed over at least `probe_window` (both per backend) while it held no lease. A
failed or slow probe, or a client's BACKEND_UNREACHABLE report, only makes it
*suspect*: new Routes prefer
another READY replica, its leases stay valid, it is probed again with backoff, and
one healthy answer clears it.

Suspicion is the router's judgment, not the replica's life: the replica stays READY
(its process, slots and drain are untouched) and the judgment is kept here, as a
state of its own (HEALTHY, SUSPECT, DEAD) changed only by `_judge`, which checks the
edge, logs once, publishes an event and counts it.
"""

import asyncio
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from enum import StrEnum

import structlog

from modeld.clock import Clock
from modeld.ops.events import HEALTH, Event, EventBus
from modeld.ops.metrics import Metrics
from modeld.routing.probe import ProbeCache
from modeld.routing.routed import RoutedReplica, routable

log = structlog.get_logger(__name__)

# The pause before probing a suspect again: doubling from the first, up to the cap.
RETRY_FIRST_S = 0.25
RETRY_CAP_S = 5.0


class Health(StrEnum):
    HEALTHY = "HEALTHY"
    SUSPECT = "SUSPECT"
    DEAD = "DEAD"


ALLOWED: dict[Health, frozenset[Health]] = {
    Health.HEALTHY: frozenset({Health.SUSPECT}),
    Health.SUSPECT: frozenset({Health.HEALTHY, Health.DEAD}),
    Health.DEAD: frozenset(),
}


@dataclass
class Suspicion:
    reason: str
    failures: int = 0  # failed probes in a row
    first_failure: float | None = None  # monotonic


Stop = Callable[[RoutedReplica, str], Awaitable[None]]


class HealthJudge:
    """The one owner of every replica's health judgment. Runs on the event loop."""

    def __init__(
        self, *, clock: Clock, prober: ProbeCache, events: EventBus, metrics: Metrics | None
    ) -> None:
        self._clock = clock
        self._prober = prober
        self._events = events
        self._metrics = metrics
        self._suspects: dict[str, Suspicion] = {}
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._stop: Stop | None = None

    def use_stop(self, stop: Stop) -> None:
        """How a replica proven dead is stopped (the router's Stopper, built after this)."""
        self._stop = stop

    def suspects(self) -> Collection[str]:
        return self._suspects.keys()

    def reason(self, replica_id: str) -> str:
        """Why the replica is suspect; empty when it is not."""
        suspicion = self._suspects.get(replica_id)
        return suspicion.reason if suspicion else ""

    def suspect(
        self, replica: RoutedReplica, reason: str, *, failed_at: float | None = None
    ) -> None:
        """Evidence against a READY replica: it becomes suspect and is watched until a
        probe clears it or it is proven dead. `failed_at`: a probe that already failed
        (the first of the count). Evidence against a suspect adds nothing: its watch
        is probing anyway."""
        if not routable(replica):
            return
        if replica.id in self._suspects:
            return
        suspicion = Suspicion(reason)
        if failed_at is not None:
            suspicion.failures, suspicion.first_failure = 1, failed_at
        self._suspects[replica.id] = suspicion
        self._judge(replica, Health.HEALTHY, Health.SUSPECT, reason)
        self._prober.invalidate(replica.id)
        task = asyncio.create_task(self._watch(replica, suspicion), name=f"suspect-{replica.id}")
        self._watches[replica.id] = task
        task.add_done_callback(lambda t: self._watch_ended(replica.id, t))

    def forget(self, replica_id: str) -> None:
        """The replica is stopping or gone: its judgment no longer matters."""
        self._suspects.pop(replica_id, None)
        task = self._watches.pop(replica_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._watches.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch(self, replica: RoutedReplica, suspicion: Suspicion) -> None:
        pause = RETRY_FIRST_S
        if suspicion.failures:
            # The probe that raised the suspicion failed just now: give it a moment.
            await self._clock.sleep_until(self._clock.monotonic() + pause)
            pause = min(pause * 2, RETRY_CAP_S)
        while routable(replica):
            result = await self._prober.check(replica, force=True)
            if result.ok:
                self._suspects.pop(replica.id, None)
                self._judge(replica, Health.SUSPECT, Health.HEALTHY, "a probe answered")
                return
            if replica.in_flight:
                # A server answers health from the queue its leases wait in: slow
                # answers while it holds leases are no evidence (its exit and a refused
                # port still are, in _verdict). The count starts once it holds none.
                suspicion.failures, suspicion.first_failure = 0, None
            else:
                suspicion.failures += 1
                if suspicion.first_failure is None:
                    suspicion.first_failure = result.at
            verdict = await self._verdict(replica, suspicion)
            if verdict:
                await self._declare_dead(replica, verdict)
                return
            await self._clock.sleep_until(self._clock.monotonic() + pause)
            pause = min(pause * 2, RETRY_CAP_S)

    async def _verdict(self, replica: RoutedReplica, suspicion: Suspicion) -> str:
        """Why the replica is dead, when the evidence proves it; empty when it does not."""
        if await replica.refuses():
            return f"its port refuses connections ({replica.address})"
        backend = replica.backend
        first = suspicion.first_failure if suspicion.first_failure is not None else 0.0
        span = self._clock.monotonic() - first
        if suspicion.failures >= backend.probe_failures and span >= backend.probe_window:
            return (
                f"{suspicion.failures} probes in a row failed over {span:.1f}s "
                f"(probe_timeout {backend.probe_limit:g}s)"
            )
        return ""

    async def _declare_dead(self, replica: RoutedReplica, why: str) -> None:
        self._suspects.pop(replica.id, None)
        # No longer a watch anyone may cancel: the stop below must run to its end.
        self._watches.pop(replica.id, None)
        self._judge(replica, Health.SUSPECT, Health.DEAD, why)
        if self._stop is not None:
            await self._stop(replica, f"unreachable: {why}")

    def _watch_ended(self, replica_id: str, task: "asyncio.Task[None]") -> None:
        if self._watches.get(replica_id) is task:
            del self._watches[replica_id]
            # A watch that ended without a verdict (the replica left READY) leaves no suspect.
            self._suspects.pop(replica_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "replica_health_watch_failed", replica_id=replica_id, exc_info=task.exception()
            )

    def _judge(self, replica: RoutedReplica, old: Health, new: Health, reason: str) -> None:
        """The only change of a replica's health judgment."""
        if new not in ALLOWED[old]:
            raise RuntimeError(f"replica {replica.id}: health {old} -> {new} is not allowed")
        emit = log.info if new is Health.HEALTHY else log.warning
        emit(
            "replica_health",
            replica_id=replica.id,
            model=replica.model,
            from_health=old.value,
            to_health=new.value,
            reason=reason,
        )
        if self._metrics is not None:
            self._metrics.health_judged(new.value)
        state = replica.state
        self._events.publish(
            Event(
                time=self._clock.wall(),
                replica_id=replica.id,
                model=replica.model,
                from_state=state,
                to_state=state,
                reason=f"{new.value.lower()}: {reason}",
                kind=HEALTH,
                health=new.value,
            )
        )
