"""In-flight slots of one replica, keyed by the lease that holds each.

The one piece of code that counts in-flight, shared by the real replica and the
test replicas. A slot is taken by a lease id and given back by the same id, so
the count is the number of live leases on the replica by construction: there is
no separate counter to drift, and giving a slot back twice is a bug that raises
instead of being clamped away. Also keeps what the watchdog's idle rule and the
picker read: last use, and since when the replica has been idle.
"""

import asyncio


class SlotError(RuntimeError):
    """A slot taken twice or given back twice: a bookkeeping bug, never a client error."""


class Slots:
    def __init__(self, now: float) -> None:
        self._held: set[str] = set()
        self.last_used = now
        self.idle_since: float | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def count(self) -> int:
        return len(self._held)

    def holders(self) -> frozenset[str]:
        return frozenset(self._held)

    def mark_ready(self, now: float) -> None:
        """The replica just became READY: the idle clock starts now."""
        self.last_used = now
        if not self._held:
            self.idle_since = now

    def take(self, holder: str, now: float) -> None:
        if holder in self._held:
            raise SlotError(f"slot {holder!r} taken twice")
        self._held.add(holder)
        self._idle.clear()
        self.idle_since = None
        self.last_used = now

    def give_back(self, holder: str, now: float) -> None:
        try:
            self._held.remove(holder)
        except KeyError:
            raise SlotError(f"slot {holder!r} given back but not held") from None
        self.last_used = now
        if not self._held:
            self.idle_since = now
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()
