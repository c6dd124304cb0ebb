"""One model's replicas: owns the set and the pending starts; the backoff is its tracker's.

Every start of a replica of this model goes through `start()`, so concurrent
Routes, a Load and min_replicas all share one spawn when one is enough. A start
is *pending* while it waits in admission: its replica does not exist yet, but
the start is part of the pool all the same (listed as ADMITTING, counted by
`planned()`, cancelled by `cancel_pending()`), so Unload, DeleteModel and
shutdown reach it. The replica is created only after admission, and only when
the launcher's gate is still open, with no await in between.

A start a Route began lasts while some Route waits for it (`waiting`): once the
last one has left (deadline, cancellation) while it is still in admission, the
pool cancels it, so it never evicts for a replica nobody waits for. A start a
Load asked for (or claimed), or min_replicas or scale-up began, is *held*: it
goes on whoever leaves, until its own deadline, Unload or shutdown.
"""

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from modeld.clock import Clock
from modeld.errors import DeadlineExceeded, ModeldError, Unavailable
from modeld.policy.backoff import DEFAULT, BackoffPolicy, BackoffState
from modeld.routing.routed import RoutedReplica, routable
from modeld.routing.start_backoff import BackoffTracker
from modeld.spec import ModelSpec
from modeld.state import LIVE, STARTING_STATES, TERMINAL, ReplicaState

log = structlog.get_logger(__name__)

RECENT_TERMINAL = 5
ABANDONED = "no caller waits for it any more"
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
    # Admission, while it runs: cancelling the start cancels it at once.
    admission: "asyncio.Future[tuple[int, ...]] | None" = None
    reason: str = ""  # why it was cancelled; empty while it is not
    ended: bool = False
    state: ReplicaState = ReplicaState.ADMITTING
    # Routes waiting for it now. A start a Load or the pool's background work asked for
    # is `held`: it goes on without waiters; a Route's start ends with its last waiter.
    waiters: int = 0
    held: bool = True

    def is_cancelled(self) -> bool:
        return bool(self.reason)

    def cancel(self, reason: str) -> bool:
        """Cancel the start (its admission at once); False when it was cancelled already."""
        if self.reason:
            return False
        self.reason = reason
        if self.admission is not None:
            self.admission.cancel()
        return True


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

    def ready(self) -> list[RoutedReplica]:
        """Replicas that serve now (`routable`)."""
        return [r for r in self.replicas.values() if routable(r)]

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
        return [p for p in list(self._pending.values()) if p.cancel(reason)]

    def claim_pending(self, count: int) -> list[asyncio.Task[RoutedReplica]]:
        """Up to `count` starts in admission, held from now on for a Load."""
        claimed = [t for t, p in self._pending.items() if not p.is_cancelled()][:count]
        for task in claimed:
            self._pending[task].held = True
        return claimed

    @contextlib.contextmanager
    def waiting(self, start: Awaitable[RoutedReplica]) -> Iterator[None]:
        """A Route waits for `start`. When the last Route waiting for a start still in
        admission leaves (its deadline passed, it was cancelled) and nothing holds the
        start, the start is cancelled: it would evict for a replica nobody waits for."""
        task = start if isinstance(start, asyncio.Task) else None
        pending = self._pending.get(task) if task is not None else None
        if task is None or pending is None:
            yield
            return
        pending.waiters += 1
        try:
            yield
        except DeadlineExceeded:
            if self._leave(task, pending):
                raise DeadlineExceeded(
                    f"model {self.model!r} was not ready within the deadline: its start was "
                    "still waiting in admission for room, and was cancelled as nobody else "
                    "waited for it"
                ) from None
            raise
        except BaseException:
            self._leave(task, pending)
            raise
        else:
            self._leave(task, pending)

    def _leave(self, task: "asyncio.Task[RoutedReplica]", pending: PendingStart) -> bool:
        """One waiter fewer; True when that abandoned the start (and it was cancelled)."""
        pending.waiters -= 1
        abandoned = not (pending.waiters or pending.held or task.done())
        if abandoned and task in self._pending and pending.cancel(ABANDONED):
            log.info("start_abandoned", model=self.model, start_id=pending.id)
            return True
        return False

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
        self, spec: ModelSpec, deadline: float, launcher: Launcher, *, held: bool = True
    ) -> asyncio.Task[RoutedReplica]:
        """Begin one more replica; the task outlives any single caller (see `waiting`)."""
        at = self.check_backoff(deadline)
        pending = PendingStart(f"admitting-{next(_ids)}", spec, self._clock.wall(), held=held)
        task = asyncio.create_task(
            self._start(spec, deadline, launcher, pending, at), name=f"start-{self.model}"
        )
        self._starts[task] = None
        self._pending[task] = pending
        task.add_done_callback(lambda t: self._starts.pop(t, None))
        task.add_done_callback(self._admitted)
        task.add_done_callback(_consume)
        return task

    def joinable(self) -> bool:
        """Whether `start_or_join` would join a start rather than begin one."""
        return bool(self._starts) or any(r.state in STARTING_STATES for r in self.servable())

    def start_or_join(
        self, spec: ModelSpec, deadline: float, launcher: Launcher
    ) -> Awaitable[RoutedReplica]:
        """A replica that is starting, or a new start when none is: cold loads coalesce.
        A new start is a Route's: it lasts while a Route is `waiting` for it."""
        starting = [r for r in self.servable() if r.state in STARTING_STATES]
        if starting:
            return ready(starting[0])
        if self._starts:
            # A start waiting out the backoff: a caller that cannot wait as long is refused.
            self.check_backoff(deadline)
            return next(iter(self._starts))
        return self.start(spec, deadline, launcher, held=False)

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
        if pending is not None and pending.is_cancelled():
            pending.ended = True
            pending.state = ReplicaState.STOPPED
            self._cancelled.append(pending)


async def _unless_cancelled(
    admission: Coroutine[Any, Any, tuple[int, ...]], pending: PendingStart
) -> tuple[int, ...]:
    """The backoff wait and admission, unless the pending start is cancelled first.

    `PendingStart.cancel` cancels the admission task itself, so admission never takes another
    step (a re-plan, an eviction) once its start is cancelled.
    """
    spec = pending.spec
    if pending.is_cancelled():
        admission.close()
        raise _cancelled(pending)
    pending.admission = admit = asyncio.ensure_future(admission)
    try:
        gpu_ids = await admit
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if pending.is_cancelled() and task is not None and not task.cancelling():
            raise _cancelled(pending) from None
        raise
    finally:
        pending.admission = None
    if pending.is_cancelled():
        log.info("start_cancelled_after_admission", model=spec.name, why=pending.reason)
        raise _cancelled(pending)
    return gpu_ids


def _cancelled(pending: PendingStart) -> Unavailable:
    return Unavailable(f"the start of model {pending.spec.name!r} was cancelled: {pending.reason}")


async def ready(replica: RoutedReplica) -> RoutedReplica:
    """The replica once READY (its start is shared with every other caller)."""
    await replica.ensure_ready()
    return replica


def _consume(task: asyncio.Task[RoutedReplica]) -> None:
    # A start nobody awaits any more (every caller gave up) must not warn at exit.
    if not task.cancelled():
        task.exception()
