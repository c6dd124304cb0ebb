"""Wake-ups for readers that hold a cursor into a ring (log followers, event watchers).

A writer never loops over its readers: it wakes a key (a replica, a model,
everything), which resolves the futures of those waiting on it now, all at once,
and costs nothing while none waits. A reader busy elsewhere (a stalled client
stream) is not waiting, so it costs the writer nothing at all.
"""

import asyncio
from collections.abc import Hashable


class Wakeups:
    """Futures of waiting followers, by key; waking a key wakes all of them once."""

    def __init__(self) -> None:
        self._waiting: dict[Hashable, set[asyncio.Future[None]]] = {}

    async def wait(self, key: Hashable, waiter: asyncio.Future[None]) -> None:
        """Awaits `waiter`, which `wake(key)` resolves (or its owner, to end early)."""
        waiters = self._waiting.setdefault(key, set())
        waiters.add(waiter)
        try:
            await waiter
        finally:
            waiters.discard(waiter)
            if not waiters and self._waiting.get(key) is waiters:
                del self._waiting[key]

    def wake(self, key: Hashable) -> None:
        waiters = self._waiting.pop(key, None)
        if waiters:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def wake_all(self) -> None:
        for key in list(self._waiting):
            self.wake(key)

    def waiting(self) -> int:
        """How many followers wait now."""
        return sum(len(w) for w in self._waiting.values())
