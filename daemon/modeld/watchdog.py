"""The watchdog: one small loop that applies the eviction rules on every tick.

Each tick reads the clock and the resources once, asks policy which replicas
must go (busy timeout, idle, memory pressure), and asks the router to stop
them. Stops run as their own tasks, so a slow stop never delays the next tick;
a replica already being stopped is not asked twice.
"""

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from modeld.clock import Clock
from modeld.policy.eviction import Eviction, busy_timeouts, idle_evictions, memory_pressure
from modeld.policy.view import HostView, ReplicaView
from modeld.resources import ResourceReader
from modeld.settings_store import SettingsStore

log = structlog.get_logger(__name__)


class Watchdog:
    def __init__(
        self,
        *,
        clock: Clock,
        reader: ResourceReader,
        settings: SettingsStore,
        views: Callable[[], list[ReplicaView]],
        observe: Callable[[HostView, dict[int, int]], None],
        evict: Callable[[Eviction, bool], Coroutine[Any, Any, None]],
        maintain: Callable[[], object],
    ) -> None:
        self._clock = clock
        self._reader = reader
        self._settings = settings
        self._views = views
        self._observe = observe
        self._evict = evict
        self._maintain = maintain
        self._stopping: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:
                log.exception("watchdog_tick_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._settings.current.watchdog_interval)
            self._wake.clear()

    def poke(self) -> None:
        """Run the next tick now (a setting changed)."""
        self._wake.set()

    def tick(self) -> list[Eviction]:
        now = self._clock.monotonic()
        settings = self._settings.current
        host = self._reader.read()
        self._observe(host, self._reader.process_gpu_memory())
        views = [v for v in self._views() if v.id not in self._stopping]
        decisions = busy_timeouts(views, settings, now) + idle_evictions(views, settings, now)
        chosen = {d.replica_id for d in decisions}
        pressure = memory_pressure([v for v in views if v.id not in chosen], settings, host)
        if pressure is not None:
            decisions.append(pressure)
        for decision in decisions:
            self._carry_out(decision, force=decision.reason == "busy_timeout")
        self._maintain()
        return decisions

    def _carry_out(self, decision: Eviction, *, force: bool) -> None:
        task = asyncio.create_task(
            self._evict(decision, force), name=f"evict-{decision.replica_id}"
        )
        self._stopping[decision.replica_id] = task
        task.add_done_callback(lambda _: self._stopping.pop(decision.replica_id, None))
        task.add_done_callback(_report)

    async def close(self) -> None:
        for task in list(self._stopping.values()):
            task.cancel()
        await asyncio.gather(*self._stopping.values(), return_exceptions=True)


def _report(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("eviction_failed", error=str(exc))
