"""Turns replica events into metrics and the systemd STATUS line.

A subscriber of the event bus, so the components that change state need not
know about metrics or systemd.
"""

from collections import Counter

from modeld.ops.events import STATE, Event, EventBus
from modeld.ops.metrics import Metrics
from modeld.ops.notify import Notifier
from modeld.routing.router import Router
from modeld.state import STARTING_STATES, ReplicaState

S = ReplicaState
_PHASE = {S.STARTING: "spawn", S.WAITING_READY: "ready", S.LOADING: "load"}


class Observer:
    def __init__(self, events: EventBus, router: Router, metrics: Metrics, notifier: Notifier):
        self._events = events
        self._router = router
        self._metrics = metrics
        self._notifier = notifier
        self._crashed: Counter[str] = Counter()

    async def run(self) -> None:
        subscription = self._events.subscribe()
        try:
            async for event in subscription:
                self.on_event(event)
        finally:
            subscription.close()

    def on_event(self, event: Event) -> None:
        if event.kind != STATE:
            # A lease expiry names the replica's current state; it is no state change.
            return
        replica = self._router.find(event.replica_id)
        backend = replica.backend_name if replica else ""
        if event.to_state is S.STARTING and self._crashed[event.model]:
            self._crashed[event.model] -= 1
            self._metrics.backend_restarted(event.model)
        elif event.to_state is S.READY and replica is not None and replica.started_at:
            self._metrics.load_finished(backend, max(event.time - replica.started_at, 0.0))
        elif event.to_state is S.FAILED and event.from_state in STARTING_STATES:
            self._metrics.load_failed(backend, _PHASE[event.from_state])
        elif event.to_state is S.FAILED and event.from_state in (S.READY, S.DRAINING):
            self._crashed[event.model] += 1
            self._metrics.backend_crashed(event.model)
        if event.from_state != event.to_state:
            self._notifier.status(self.summary())

    def summary(self) -> str:
        """The systemd STATUS line: what a person running `systemctl status` wants first."""
        counts = Counter(r.state for r in self._router.live_replicas())
        loading = sum(counts[s] for s in STARTING_STATES)
        return f"{counts[S.READY]} ready, {loading} loading"
