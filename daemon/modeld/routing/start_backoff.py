"""One model's start backoff, carried out: the only owner of its state.

The decisions are pure (`policy/backoff.py`); this tracker holds what they need
between calls: the backoff state, the crash-loop window of the latest start,
and when each replica started by the model's pool became READY (a death soon
after READY is a crash loop; the replica index also reads these times, to tell
a process reading taken mid-load from one taken after READY).
"""

import time
from collections.abc import Callable, Iterable

import structlog

from modeld.clock import Clock
from modeld.errors import Unavailable
from modeld.policy import backoff
from modeld.spec import ModelSpec

log = structlog.get_logger(__name__)


class BackoffTracker:
    def __init__(
        self,
        model: str,
        clock: Clock,
        policy: Callable[[ModelSpec], backoff.BackoffPolicy] = lambda _: backoff.DEFAULT,
    ) -> None:
        self.model = model
        self._clock = clock
        self._policy_of = policy
        self._policy = backoff.DEFAULT
        self._ready_since: dict[str, float] = {}
        self.state: backoff.BackoffState | None = None

    def starting(self, spec: ModelSpec) -> None:
        """A start begins: the backend's crash-loop window, as the latest start found it."""
        self._policy = self._policy_of(spec)

    def ready(self, replica_id: str) -> None:
        now = self._clock.monotonic()
        self._ready_since[replica_id] = now
        self.state = backoff.after_ready(self.state, now, self._policy)

    def ready_since(self, replica_id: str) -> float | None:
        """When the replica became READY (monotonic), while it is known to the pool."""
        return self._ready_since.get(replica_id)

    def failed(self, reason: str) -> None:
        """A start failed (not one cut short by a stop: that says nothing about the model)."""
        self.state = backoff.after_failure(self.state, self._clock.monotonic(), reason)

    def crashed(self, replica_id: str, reason: str) -> None:
        """A READY (or DRAINING) replica died. Soon after READY it was a crash loop and
        counts as a failed start; later, the next demand simply starts a replacement."""
        now = self._clock.monotonic()
        ready_since = self._ready_since.pop(replica_id, None)
        if ready_since is not None:
            reason = f"replica {replica_id} died {now - ready_since:.1f}s after READY: {reason}"
        self.state = backoff.after_crash(self.state, now, ready_since, reason, self._policy)
        if not backoff.is_crash_loop(ready_since, now, self._policy) or self.state is None:
            log.info("replica_crash_replaced_on_demand", model=self.model, replica_id=replica_id)
            return
        log.warning(
            "model_backing_off",
            model=self.model,
            replica_id=replica_id,
            failures=self.state.failures,
            retry_in_s=round(self.state.not_before - now, 3),
            reason=f"crash loop: {reason}",
        )

    def keep(self, replica_ids: Iterable[str]) -> None:
        """Forget the READY times of replicas the pool no longer knows."""
        known = set(replica_ids)
        for rid in [rid for rid in self._ready_since if rid not in known]:
            del self._ready_since[rid]

    def check(self, deadline: float | None = None) -> float:
        """When a start asked for now may begin (monotonic); raises Unavailable when the
        caller's deadline (default: now) ends before the next attempt is allowed."""
        now = self._clock.monotonic()
        decision = backoff.decide_start(self.state, now, now if deadline is None else deadline)
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
