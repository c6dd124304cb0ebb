"""In-process publish/subscribe of replica state changes.

Publishing never blocks: each subscriber has a bounded queue, and a subscriber
that falls behind loses events (counted) instead of slowing the publisher.
"""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from modeld.state import ReplicaState


@dataclass(frozen=True)
class Event:
    time: float  # wall clock, seconds since the epoch
    replica_id: str
    model: str
    from_state: ReplicaState | None
    to_state: ReplicaState
    reason: str = ""
    # STATE: a replica changed state. LEASE_EXPIRED: a lease ran out (the states are the
    # replica's current one, unchanged); observers that count state changes skip it.
    kind: str = "state"


STATE = "state"
LEASE_EXPIRED = "lease_expired"


class Subscription:
    def __init__(self, bus: "EventBus", model: str | None, maxsize: int) -> None:
        self._bus = bus
        self.model = model
        # One slot beyond maxsize keeps room for the end-of-stream marker (None).
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize + 1)
        self._maxsize = maxsize
        self.dropped = 0

    def offer(self, event: Event) -> None:
        if self.model is not None and event.model != self.model:
            return
        if self.queue.qsize() >= self._maxsize:
            self.dropped += 1
            return
        self.queue.put_nowait(event)

    def finish(self) -> None:
        """End iteration once the queued events are read."""
        self.queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while (event := await self.queue.get()) is not None:
            yield event

    def close(self) -> None:
        self._bus.unsubscribe(self)


class EventBus:
    def __init__(self, queue_size: int = 1024) -> None:
        self._subs: set[Subscription] = set()
        self._queue_size = queue_size

    def publish(self, event: Event) -> None:
        for sub in tuple(self._subs):
            sub.offer(event)

    def subscribe(self, model: str | None = None) -> Subscription:
        sub = Subscription(self, model, self._queue_size)
        self._subs.add(sub)
        return sub

    def close_all(self) -> None:
        """The daemon is stopping: every watcher's stream ends."""
        for sub in tuple(self._subs):
            sub.finish()
            self._subs.discard(sub)

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)
