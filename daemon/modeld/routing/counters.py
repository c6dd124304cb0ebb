"""Batched writes of the router's ephemeral counters to the registry.

In-flight counts, last use and free memory change on every Route and Release,
so writing them through would put a transaction on the hot path. Instead one
task writes every live replica's counters about once a second, and only when
something changed since the last write. All rows of a batch share one
wall-clock offset, so the stored last-use times order like the in-memory ones.
"""

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence

import structlog

from modeld.clock import Clock
from modeld.errors import Unavailable
from modeld.policy.picker import CounterRow, counter_row, free_on_device, used_tick
from modeld.policy.view import ReplicaView

log = structlog.get_logger(__name__)

Flush = Callable[[Sequence[CounterRow]], Awaitable[None]]
FLUSH_INTERVAL_S = 1.0


class CounterFlusher:
    def __init__(
        self,
        *,
        clock: Clock,
        views: Callable[[], Sequence[ReplicaView]],
        free_memory: Callable[[], Mapping[int | None, int]],
        flush: Flush,
        interval: float = FLUSH_INTERVAL_S,
    ) -> None:
        self._clock = clock
        self._views = views
        self._free_memory = free_memory
        self._flush = flush
        self._interval = interval
        self._written: dict[str, tuple[int, int, int]] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush_once()
            except Unavailable as exc:
                log.warning("counters_not_written", error=str(exc))

    async def flush_once(self) -> bool:
        """Write every live replica's counters if any changed; True when it wrote."""
        views = self._views()
        free = self._free_memory()
        snapshot = {
            v.id: (v.in_flight, used_tick(v.last_used), free_on_device(v, free)) for v in views
        }
        if snapshot == self._written:
            return False
        offset = self._clock.wall() - self._clock.monotonic()
        await self._flush([counter_row(v, free, offset) for v in views])
        self._written = snapshot
        return True
