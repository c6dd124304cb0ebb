"""One model's replicas: owns the set, the coalesced starts and the failure backoff.

Every start of a replica of this model goes through `start()`, so concurrent
Routes, a Load and min_replicas all share one spawn when one is enough.
"""

import asyncio
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
    def __init__(self, model: str, clock: Clock, factory: Factory, admit: Admit) -> None:
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

    def note_crash(self, reason: str) -> None:
        self.backoff = backoff.after_failure(self.backoff, self._clock.monotonic(), reason)

    def check_backoff(self) -> None:
        now = self._clock.monotonic()
        state = backoff.check(self.backoff, now)
        if state is not None:
            raise Unavailable(
                f"model {self.model!r} is backing off after {state.failures} failed start(s); "
                f"next attempt allowed in {state.not_before - now:.1f}s. "
                f"Last error: {state.reason}"
            )

    def start(self, spec: ModelSpec, deadline: float) -> asyncio.Task[Replica]:
        """Begin one more replica; the task outlives any single caller."""
        self.check_backoff()
        task = asyncio.create_task(self._start(spec, deadline), name=f"start-{self.model}")
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
            return next(iter(self._starts))
        return self.start(spec, deadline)

    async def _start(self, spec: ModelSpec, deadline: float) -> Replica:
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
                    self.backoff, self._clock.monotonic(), str(exc)
                )
            self.prune()
            raise
        self.backoff = None
        return replica


async def ready(replica: Replica) -> Replica:
    """The replica once READY (its start is shared with every other caller)."""
    await replica.ensure_ready()
    return replica


def _consume(task: asyncio.Task[Replica]) -> None:
    # A start nobody awaits any more (every caller gave up) must not warn at exit.
    if not task.cancelled():
        task.exception()
