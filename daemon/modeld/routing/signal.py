"""The capacity signal: wakes whoever waits for room the moment room may have appeared.

Admission waits on it when only busy replicas, starts or stops stand in its way.
It is set, directly by the owner of the change, when a lease ends, a replica
becomes READY, stops or crashes, and when a setting changes (raising max_loaded
or allowing forced eviction can admit a waiter without anything else moving).
Each wait takes the current event; `changed()` sets it and starts a new one, so
a change between a reading and the wait is never lost.

Listeners (the route queues) are called synchronously on each change, in the turn
of the change itself: a freed slot is handed to a waiter before anyone else runs.
"""

import asyncio
from collections.abc import Callable


class CapacitySignal:
    def __init__(self) -> None:
        self._event: asyncio.Event | None = None
        self._listeners: list[Callable[[], None]] = []

    def listen(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def event(self) -> asyncio.Event:
        """Set the next time capacity may have changed (take it before reading)."""
        if self._event is None:
            self._event = asyncio.Event()
        return self._event

    def changed(self) -> None:
        for listener in self._listeners:
            listener()
        if self._event is not None:
            self._event.set()
            self._event = None
