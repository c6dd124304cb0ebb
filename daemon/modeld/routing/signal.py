"""The capacity signal: wakes whoever waits for room the moment room may have appeared.

Admission waits on it when only busy replicas, starts or stops stand in its way.
It is set, directly by the owner of the change, when a lease ends, a replica
becomes READY, stops or crashes, and when a setting changes (raising max_loaded
or allowing forced eviction can admit a waiter without anything else moving).
Each wait takes the current event; `changed()` sets it and starts a new one, so
a change between a reading and the wait is never lost.
"""

import asyncio


class CapacitySignal:
    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def event(self) -> asyncio.Event:
        """Set the next time capacity may have changed (take it before reading)."""
        if self._event is None:
            self._event = asyncio.Event()
        return self._event

    def changed(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None
