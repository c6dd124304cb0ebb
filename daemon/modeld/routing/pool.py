"""One model's replicas: owns the set and the pending starts; the backoff is its tracker's.

Every start of a replica of this model goes through `start()`, so concurrent
Routes, a Load and min_replicas all share one spawn when one is enough. A start
is *pending* while it waits in admission: its replica does not exist yet, but
the start is part of the pool all the same (listed as ADMITTING, counted by
`planned()`, cancelled by `cancel_pending()`), so Unload, DeleteModel and
shutdown reach it. The replica is created only after admission, and only when
the launcher's gate is still open, with no await in between.
"""

import asyncio
import itertools
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from modeld.clock import Clock
from modeld.errors import ModeldError, Unavailable
from modeld.policy.backoff import DEFAULT, BackoffPolicy, BackoffState
from modeld.routing.routed import RoutedReplica
from modeld.routing.start_backoff import BackoffTracker
from modeld.spec import ModelSpec
from modeld.state import LIVE, STARTING_STATES, TERMINAL, ReplicaState

log = structlog.get_logger(__name__)

RECENT_TERMINAL = 5
_ids = itertools.count(1)


class Launcher(Protocol):
    """Admission and creation of a replica (the lifecycle implements it)."""

    async def admit(self, spec: ModelSpec, deadline: float) -> tuple[int, ...]: ...

    def create(self, spec: ModelSpec, gpu_ids: tuple[int, ...]) -> RoutedReplica:
        """The new replica; raises Unavailable once the gate is closed."""
        ...


@dataclass(eq=False)
class PendingStart:
    """A start waiting in admission: visible (ADMITTING) and cancellable."""

    id: str
    spec: ModelSpec
    since: float  # wall clock
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""
    ended: bool = False
    state: ReplicaState = ReplicaState.ADMITTING


class ModelPool:
    def __init__(
        self,
        model: str,
        clock: Clock,
        policy: Callable[[ModelSpec], BackoffPolicy] = lambda _: DEFAULT,
    ) -> None:
        self.model = model
        self._clock = clock
        self._backoff = BackoffTracker(model, clock, policy)
        self.replicas: dict[str, RoutedReplica] = {}
        self._ended: deque[RoutedReplica] = deque(maxlen=RECENT_TERMINAL)
        # Ordered (a dict), so which start a Route joins does not depend on hashing.
        self._starts: dict[asyncio.Task[RoutedReplica], None] = {}
        self._pending: dict[asyncio.Task[RoutedReplica], PendingStart] = {}
        self._cancelled: deque[PendingStart] = deque(maxlen=RECENT_TERMINAL)

    @property
    def backoff(self) -> BackoffState | None:
        return self._backoff.state

    def live(self) -> list[RoutedReplica]:
        return [r for r in self.replicas.values() if r.state in LIVE]

    def servable(self) -> list[RoutedReplica]:
        """Replicas that serve now or will once their start finishes (and are not stopping)."""
        return [
            r
            for r in self.replicas.values()
            if (r.state is ReplicaState.READY or r.state in STARTING_STATES)
            and not r.stop_requested
        ]

    def all(self) -> list[RoutedReplica]:
        return [*self._ended, *self.replicas.values()]

    def pending(self) -> int:
        return len(self._starts)

    def admitting(self) -> list[PendingStart]:
        return list(self._pending.values())

    def cancelled(self) -> list[PendingStart]:
        return list(self._cancelled)

    def pending_tasks(self) -> list[asyncio.Task[RoutedReplica]]:
        return list(self._pending)

    def planned(self) -> int:
        """Replicas that serve, are starting, or are about to start (in admission)."""
        return len(self.servable()) + len(self._pending)

    def prune(self) -> None:
        """Move replicas that reached a terminal state out of the live set."""
        for rid, replica in list(self.replicas.items()):
            if replica.state in TERMINAL:
                del self.replicas[rid]
                self._ended.append(replica)
        # A crashed replica's time stays until note_crash reads it (its event may come later).
        self._backoff.keep(r.id for r in self.all())

    def cancel_pending(self, reason: str) -> list[PendingStart]:
        """End every start still in admission; their callers get Unavailable naming `reason`."""
        cancelled = []
        for pending in self._pending.values():
            if not pending.cancelled.is_set():
                pending.reason = reason
                pending.cancelled.set()
                cancelled.append(pending)
        return cancelled

    def note_crash(self, reason: str, replica_id: str) -> None:
        """A READY (or DRAINING) replica died: the backoff tracker tells a crash loop."""
        self._backoff.crashed(replica_id, reason)

    def check_backoff(self, deadline: float | None = None) -> float:
        """When a start asked for now may begin; raises Unavailable past the deadline."""
        return self._backoff.check(deadline)

    def ready_since(self, replica_id: str) -> float | None:
        """When a replica this pool started became READY (monotonic)."""
        return self._backoff.ready_since(replica_id)

    def start(
        self, spec: ModelSpec, deadline: float, launcher: Launcher
    ) -> asyncio.Task[RoutedReplica]:
        """Begin one more replica; the task outlives any single caller."""
        at = self.check_backoff(deadline)
        pending = PendingStart(f"admitting-{next(_ids)}", spec, self._clock.wall())
        task = asyncio.create_task(
            self._start(spec, deadline, launcher, pending, at), name=f"start-{self.model}"
        )
        self._starts[task] = None
        self._pending[task] = pending
        task.add_done_callback(lambda t: self._starts.pop(t, None))
        task.add_done_callback(self._admitted)
        task.add_done_callback(_consume)
        return task

    def start_or_join(
        self, spec: ModelSpec, deadline: float, launcher: Launcher
    ) -> Awaitable[RoutedReplica]:
        """A replica that is starting, or a new start when none is: cold loads coalesce."""
        starting = [r for r in self.servable() if r.state in STARTING_STATES]
        if starting:
            return ready(starting[0])
        if self._starts:
            # A start waiting out the backoff: a caller that cannot wait as long is refused.
            self.check_backoff(deadline)
            return next(iter(self._starts))
        return self.start(spec, deadline, launcher)

    async def _start(
        self,
        spec: ModelSpec,
        deadline: float,
        launcher: Launcher,
        pending: PendingStart,
        at: float,
    ) -> RoutedReplica:
        self._backoff.starting(spec)
        gpu_ids = await _unless_cancelled(self._admit_after(launcher, spec, deadline, at), pending)
        replica = launcher.create(spec, gpu_ids)
        task = asyncio.current_task()
        if task is not None:
            self._pending.pop(task, None)
        self.replicas[replica.id] = replica
        try:
            await replica.ensure_ready()
        except ModeldError as exc:
            # A start cut short by a stop (unload, shutdown) says nothing about the model.
            if replica.state is ReplicaState.FAILED:
                self._backoff.failed(str(exc))
            self.prune()
            raise
        self._backoff.ready(replica.id)
        return replica

    async def _admit_after(
        self, launcher: Launcher, spec: ModelSpec, deadline: float, at: float
    ) -> tuple[int, ...]:
        if at > self._clock.monotonic():
            await self._clock.sleep_until(at)
        return await launcher.admit(spec, deadline)

    def _admitted(self, task: "asyncio.Task[RoutedReplica]") -> None:
        pending = self._pending.pop(task, None)
        if pending is not None and pending.cancelled.is_set():
            pending.ended = True
            pending.state = ReplicaState.STOPPED
            self._cancelled.append(pending)


async def _unless_cancelled(
    admission: Awaitable[tuple[int, ...]], pending: PendingStart
) -> tuple[int, ...]:
    """The backoff wait and admission, unless the pending start is cancelled first."""
    spec = pending.spec
    admit = asyncio.ensure_future(admission)
    cancel = asyncio.ensure_future(pending.cancelled.wait())
    try:
        await asyncio.wait((admit, cancel), return_when=asyncio.FIRST_COMPLETED)
    finally:
        cancel.cancel()
        if not admit.done():
            admit.cancel()
            await asyncio.gather(admit, return_exceptions=True)
    if pending.cancelled.is_set():
        if admit.done() and not admit.cancelled() and admit.exception() is None:
            log.info("start_cancelled_after_admission", model=spec.name, why=pending.reason)
        raise Unavailable(f"the start of model {spec.name!r} was cancelled: {pending.reason}")
    return admit.result()


async def ready(replica: RoutedReplica) -> RoutedReplica:
    """The replica once READY (its start is shared with every other caller)."""
    await replica.ensure_ready()
    return replica


def _consume(task: asyncio.Task[RoutedReplica]) -> None:
    # A start nobody awaits any more (every caller gave up) must not warn at exit.
    if not task.cancelled():
        task.exception()
