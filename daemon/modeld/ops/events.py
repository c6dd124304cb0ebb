"""In-process publish/subscribe of replica state changes.

Publishing never blocks and costs the same whatever the number of watchers: an
event goes into a bounded ring (one for every watcher of all models, and one per
model that has watchers), and each watcher holds a cursor into its ring and is
woken, not pushed to. A watcher that falls more than the ring behind loses the
oldest events (counted in `dropped`) instead of slowing the publisher.
"""

import asyncio
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass

from modeld.ops.wakeups import Wakeups
from modeld.state import ReplicaState

ALL: Hashable = ("all",)


@dataclass(frozen=True)
class Event:
    time: float  # wall clock, seconds since the epoch
    replica_id: str
    model: str
    from_state: ReplicaState | None
    to_state: ReplicaState
    reason: str = ""
    # STATE: a replica changed state. LEASE_EXPIRED: a lease ran out, HEALTH: see below
    # (the states are the replica's current one, unchanged); observers that count state
    # changes skip both.
    # CLUSTER: another host's replica changed, as the cluster view saw it.
    kind: str = "state"
    # CLUSTER events: the host whose replica changed.
    host_id: str = ""
    # HEALTH events: the router's judgment of a READY replica changed (routing/judge.py):
    # SUSPECT, HEALTHY (cleared) or DEAD; the states are the replica's current one.
    health: str = ""


STATE = "state"
LEASE_EXPIRED = "lease_expired"
CLUSTER = "cluster"
HEALTH = "health"


class _Ring:
    """The newest `size` events; event n (counting from 0) sits in slot n % size."""

    __slots__ = ("end", "size", "slots", "watchers")

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list[Event] = []
        self.end = 0  # the number of the next event
        self.watchers = 0

    def append(self, event: Event) -> None:
        if len(self.slots) < self.size:
            self.slots.append(event)
        else:
            self.slots[self.end % self.size] = event
        self.end += 1

    def get(self, n: int) -> Event:
        return self.slots[n % self.size]


class Subscription:
    """One watcher's cursor into its ring. Iterate it; close() ends it."""

    def __init__(self, bus: "EventBus", model: str | None, ring: _Ring) -> None:
        self._bus = bus
        self.model = model
        self.ring = ring
        self._key = ALL if model is None else ("model", model)
        self._cursor = ring.end
        self._lost = 0
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    @property
    def dropped(self) -> int:
        """Events this watcher lost, in total, because it read too slowly."""
        return self._lost + self._behind()

    def pending(self) -> list[Event]:
        """The events published since it last read, taken without waiting."""
        events = []
        while (event := self._next()) is not None:
            events.append(event)
        return events

    async def __aiter__(self) -> AsyncIterator[Event]:
        while not self._closed:
            event = self._next()
            if event is not None:
                yield event
            elif self._bus.closing:
                return
            else:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._bus.wakeups.wait(self._key, self._waiter)
                finally:
                    self._waiter = None

    def close(self) -> None:
        """Stops watching; an iteration waiting for the next event ends."""
        if self._closed:
            return
        self._closed = True
        self._bus.unsubscribe(self)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _behind(self) -> int:
        return max(0, self.ring.end - self.ring.size - self._cursor)

    def _next(self) -> Event | None:
        if self._closed:
            return None
        if behind := self._behind():
            self._lost += behind
            self._cursor += behind
        if self._cursor == self.ring.end:
            return None
        self._cursor += 1
        return self.ring.get(self._cursor - 1)


class EventBus:
    def __init__(self, queue_size: int = 1024) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self._queue_size = queue_size
        self._all = _Ring(queue_size)
        # Rings of the models someone watches; an event of any other model skips them.
        self._models: dict[str, _Ring] = {}
        self.wakeups = Wakeups()
        self.closing = False

    def publish(self, event: Event) -> None:
        self._all.append(event)
        ring = self._models.get(event.model)
        if ring is not None:
            ring.append(event)
            self.wakeups.wake(("model", event.model))
        self.wakeups.wake(ALL)

    def subscribe(self, model: str | None = None) -> Subscription:
        if model is None:
            ring = self._all
        elif model in self._models:
            ring = self._models[model]
        else:
            ring = self._models[model] = _Ring(self._queue_size)
        ring.watchers += 1
        return Subscription(self, model, ring)

    def close_all(self) -> None:
        """The daemon is stopping: every watcher's stream ends once it has read what
        was published."""
        self.closing = True
        self.wakeups.wake_all()

    def unsubscribe(self, sub: Subscription) -> None:
        sub.ring.watchers -= 1
        if sub.model is not None and not sub.ring.watchers:
            self._models.pop(sub.model, None)

    @property
    def subscriber_count(self) -> int:
        return self._all.watchers + sum(ring.watchers for ring in self._models.values())
