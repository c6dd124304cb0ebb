"""One model's replicas: owns the set, the coalesced starts and the failure backoff.

Every start of a replica of this model goes through `start()`, so concurrent
Routes, a Load and min_replicas all share one spawn when one is enough.
"""

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable

import structlog

from modeld.clock import Clock
from modeld.errors import ModeldError, Unavailable
from modeld.policy import backoff
from modeld.spec import ModelSpec
from modeld.state import LIVE, STARTING_STATES, TERMINAL, ReplicaState
from modeld.supervisor.replica import Replica

log = structlog.get_logger(__name__)

# Admission decides (and carries out) what must stop first, and returns the GPU ids.
Admit = Callable[[ModelSpec, float], Awaitable[tuple[int, ...]]]
Factory = Callable[[ModelSpec, tuple[int, ...]], Replica]
RECENT_TERMINAL = 5


class ModelPool:
    def __init__(
        self,
        model: str,
        clock: Clock,
        factory: Factory,
        admit: Admit,
        policy: Callable[[ModelSpec], backoff.BackoffPolicy] = lambda _: backoff.DEFAULT,
    ) -> None:
        self.model = model
        self._clock = clock
        self._factory = factory
        self._admit = admit
        self.replicas: dict[str, Replica] = {}
        self._ended: deque[Replica] = deque(maxlen=RECENT_TERMINAL)
        self._starts: set[asyncio.Task[Replica]] = set()
        # Starts still in admission: their replica does not exist yet.
        self._admitting: set[asyncio.Future[Replica]] = set()
        self.backoff: backoff.BackoffState | None = None
        self._policy_of = policy
        self._policy = backoff.DEFAULT
        # When each replica this pool started became READY, to tell a crash loop from a crash.
        self._ready_since: dict[str, float] = {}

    def live(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.state in LIVE]

    def servable(self) -> list[Replica]:
        """Replicas that serve now or will once their start finishes."""
        return [
            r
            for r in self.replicas.values()
            if r.state is ReplicaState.READY or r.state in STARTING_STATES
        ]

    def all(self) -> list[Replica]:
        return [*self._ended, *self.replicas.values()]

    def pending(self) -> int:
        return len(self._starts)

    def planned(self) -> int:
        """Replicas that serve, are starting, or are about to start (in admission)."""
        return len(self.servable()) + len(self._admitting)

    def prune(self) -> None:
        """Move replicas that reached a terminal state out of the live set."""
        for rid, replica in list(self.replicas.items()):
            if replica.state in TERMINAL:
                del self.replicas[rid]
                self._ended.append(replica)
        # A crashed replica's time stays until note_crash reads it (its event may come later).
        known = {r.id for r in self.all()}
        for rid in [rid for rid in self._ready_since if rid not in known]:
            del self._ready_since[rid]

    def note_crash(self, reason: str, replica_id: str) -> None:
        """A READY (or DRAINING) replica died. Soon after READY it was a crash loop and
        counts as a failed start; later, the next demand simply starts a replacement."""
        now = self._clock.monotonic()
        ready_since = self._ready_since.pop(replica_id, None)
        if ready_since is not None:
            reason = f"replica {replica_id} died {now - ready_since:.1f}s after READY: {reason}"
        self.backoff = backoff.after_crash(self.backoff, now, ready_since, reason, self._policy)
        if not backoff.is_crash_loop(ready_since, now, self._policy) or self.backoff is None:
            log.info("replica_crash_replaced_on_demand", model=self.model, replica_id=replica_id)
            return
        log.warning(
            "model_backing_off",
            model=self.model,
            replica_id=replica_id,
            failures=self.backoff.failures,
            retry_in_s=round(self.backoff.not_before - now, 3),
            reason=f"crash loop: {reason}",
        )

    def check_backoff(self, deadline: float | None = None) -> float:
        """When a start asked for now may begin (monotonic); raises Unavailable when the
        caller's deadline (default: now) ends before the next attempt is allowed."""
        now = self._clock.monotonic()
        decision = backoff.decide_start(self.backoff, now, now if deadline is None else deadline)
        state = decision.refused
        if state is not None:
            wait = state.not_before - now
            at = time.strftime("%H:%M:%S", time.gmtime(self._clock.wall() + wait))
            raise Unavailable(
                f"model {self.model!r} is backing off after {state.failures} failure(s) to "
                "start or to stay up; "
                f"next attempt at {at} UTC (in {wait:.1f}s), after this call's deadline. "
                f"Last error: {state.reason}"
            )
        return decision.at

    def start(self, spec: ModelSpec, deadline: float) -> asyncio.Task[Replica]:
        """Begin one more replica; the task outlives any single caller."""
        at = self.check_backoff(deadline)
        task = asyncio.create_task(self._start(spec, deadline, at), name=f"start-{self.model}")
        self._starts.add(task)
        self._admitting.add(task)
        task.add_done_callback(self._starts.discard)
        task.add_done_callback(self._admitting.discard)
        task.add_done_callback(_consume)
        return task

    def start_or_join(self, spec: ModelSpec, deadline: float) -> Awaitable[Replica]:
        """A replica that is starting, or a new start when none is: cold loads coalesce."""
        starting = [r for r in self.replicas.values() if r.state in STARTING_STATES]
        if starting:
            return ready(starting[0])
        if self._starts:
            # A start waiting out the backoff: a caller that cannot wait as long is refused.
            self.check_backoff(deadline)
            return next(iter(self._starts))
        return self.start(spec, deadline)

    async def _start(self, spec: ModelSpec, deadline: float, at: float) -> Replica:
        # The backend's crash-loop window, as the latest start found it.
        self._policy = self._policy_of(spec)
        if at > self._clock.monotonic():
            await self._clock.sleep_until(at)
        gpu_ids = await self._admit(spec, deadline)
        replica = self._factory(spec, gpu_ids)
        self._admitting.discard(asyncio.current_task())
        self.replicas[replica.id] = replica
        try:
            await replica.ensure_ready()
        except ModeldError as exc:
            # A start cut short by a stop (unload, shutdown) says nothing about the model.
            if replica.state is ReplicaState.FAILED:
                self.backoff = backoff.after_failure(
                    self.backoff, self._clock.monotonic(), str(exc), self._policy
                )
            self.prune()
            raise
        now = self._clock.monotonic()
        self._ready_since[replica.id] = now
        self.backoff = backoff.after_ready(self.backoff, now, self._policy)
        return replica


async def ready(replica: Replica) -> Replica:
    """The replica once READY (its start is shared with every other caller)."""
    await replica.ensure_ready()
    return replica


def _consume(task: asyncio.Task[Replica]) -> None:
    # A start nobody awaits any more (every caller gave up) must not warn at exit.
    if not task.cancelled():
        task.exception()
