"""The clock, injected everywhere timing matters so tests can drive it."""

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> float: ...

    async def sleep_until(self, when: float) -> None:
        """Return once monotonic() has reached `when`."""


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep_until(self, when: float) -> None:
        await asyncio.sleep(max(when - time.monotonic(), 0.0))


class FakeClock:
    """A clock that only moves when a test advances it."""

    def __init__(self, start: float = 1000.0, wall_offset: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_offset
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    async def sleep_until(self, when: float) -> None:
        if when <= self._now:
            return
        waiter = asyncio.get_running_loop().create_future()
        entry = (when, waiter)
        self._sleepers.append(entry)
        try:
            await waiter
        finally:
            self._sleepers.remove(entry)

    def advance(self, seconds: float) -> None:
        self._now += seconds
        for when, waiter in self._sleepers:
            if when <= self._now and not waiter.done():
                waiter.set_result(None)
