"""The watchdog: one small loop that applies the eviction rules on every tick.

Each tick reads the resources once (in a worker thread, through the sampler, so
NVML and /proc never block the event loop), then reads the clock, asks policy
which replicas must go (busy timeout, idle, memory pressure), and asks the
router to stop them. The deciding part runs with no await, so it never acts on
a stale read; the stops run as their own tasks, so a slow stop never delays the next tick, and a
replica already being stopped is not asked twice. Memory pressure stops one
replica at a time: the next is chosen only once that stop has finished and the
memory has been read again.
"""

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from modeld.capacity.admission import evict_if_due
from modeld.capacity.resources import ResourceReader
from modeld.capacity.sampler import ProcessReading, Sampler
from modeld.clock import Clock
from modeld.ops.events import STATE, EventBus
from modeld.policy.eviction import Eviction, busy_timeouts, idle_evictions, memory_pressure
from modeld.policy.view import HostView, ReplicaView
from modeld.state import ReplicaState
from modeld.storage.settings_store import SettingsStore

log = structlog.get_logger(__name__)

# Evictions that must take a busy replica: a stuck backend's leases are never released.
_FORCED = frozenset({"busy_timeout"})


class Watchdog:
    def __init__(
        self,
        *,
        clock: Clock,
        reader: ResourceReader,
        settings: SettingsStore,
        views: Callable[[], list[ReplicaView]],
        observe: Callable[[HostView, ProcessReading], None],
        evict: Callable[[Eviction, bool], Coroutine[Any, Any, None]],
        maintain: Callable[[], object],
        events: EventBus | None = None,
    ) -> None:
        self._clock = clock
        self._events = events
        self._sampler = Sampler(reader, clock)
        self._settings = settings
        self._views = views
        self._observe = observe
        self._evict = evict
        self._maintain = maintain
        self._stopping: dict[str, tuple[Eviction, asyncio.Task[bool]]] = {}
        self._wake = asyncio.Event()
        self._read_error = ""

    async def run(self) -> None:
        ready = asyncio.create_task(self._tick_on_ready()) if self._events else None
        try:
            while True:
                try:
                    await self.tick()
                except Exception:
                    log.exception("watchdog_tick_failed")
                # Read on every round, so a changed interval applies from the next wait.
                interval = self._settings.current.watchdog_interval
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), interval)
                self._wake.clear()
        finally:
            if ready is not None:
                ready.cancel()
                await asyncio.gather(ready, return_exceptions=True)

    async def _tick_on_ready(self) -> None:
        """A replica just READY is measured now rather than a tick later: until a reading
        begun after READY arrives it counts as at least its estimate, which is a guess."""
        assert self._events is not None
        subscription = self._events.subscribe()
        try:
            async for event in subscription:
                if event.kind == STATE and event.to_state is ReplicaState.READY:
                    self.poke()
        finally:
            subscription.close()

    def poke(self) -> None:
        """Run the next tick now (a setting changed, a replica became READY)."""
        self._wake.set()

    async def tick(self) -> list[Eviction]:
        """Decide and start this tick's evictions; returns them (the stops run on)."""
        host = await self._read()
        now = self._clock.monotonic()
        settings = self._settings.current
        views = [v for v in self._views() if v.id not in self._stopping]
        decisions = busy_timeouts(views, settings, now) + idle_evictions(views, settings, now)
        if host is not None and not self._memory_stop_running():
            chosen = {d.replica_id for d in decisions}
            pressure = memory_pressure([v for v in views if v.id not in chosen], settings, host)
            if pressure is not None:
                decisions.append(pressure)
        for decision in decisions:
            self._carry_out(decision)
        self._maintain()
        return decisions

    async def settle(self) -> None:
        """Wait for the evictions started so far to finish."""
        await asyncio.gather(
            *(task for _, task in list(self._stopping.values())), return_exceptions=True
        )

    async def _read(self) -> HostView | None:
        """This tick's readings, or None when they cannot be had; the timeouts still apply."""
        try:
            host = await self._sampler.host()
            processes = await self._sampler.processes()
        except (OSError, ValueError) as exc:
            if str(exc) != self._read_error:
                self._read_error = str(exc)
                log.warning("resources_unreadable", error=str(exc))
            return None
        if self._read_error:
            self._read_error = ""
            log.info("resources_readable")
        self._observe(host, processes)
        return host

    def _memory_stop_running(self) -> bool:
        return any(e.reason == "memory" for e, _ in self._stopping.values())

    def _carry_out(self, decision: Eviction) -> None:
        force = decision.reason in _FORCED
        task = asyncio.create_task(
            evict_if_due(self._views, self._evict, decision, force),
            name=f"evict-{decision.replica_id}",
        )
        self._stopping[decision.replica_id] = (decision, task)
        task.add_done_callback(lambda _: self._stopping.pop(decision.replica_id, None))
        task.add_done_callback(_report)

    async def close(self) -> None:
        tasks = [task for _, task in self._stopping.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _report(task: asyncio.Task[bool]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("eviction_failed", error=str(exc))
