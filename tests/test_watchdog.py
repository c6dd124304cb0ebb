"""The watchdog tick and the router's eviction side, on a fake clock and fake readings.

A real Router, Admission and Watchdog run over FakeReplicas (lease bookkeeping
without processes), so leases, views, counters and evictions are the real ones.
"""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest
import structlog

from modeld.capacity.admission import Admission, Evictor
from modeld.capacity.watchdog import Watchdog
from modeld.clock import FakeClock
from modeld.errors import NotFound, ResourceExhausted
from modeld.ops.events import EventBus
from modeld.ops.metrics import Metrics
from modeld.policy.eviction import Eviction
from modeld.routing.leases import Lease
from modeld.routing.lifecycle import Admit
from modeld.routing.probe import ProbeCache
from modeld.routing.routed import Listener
from modeld.routing.router import Router, build_router
from modeld.spec import ModelSpec, Settings
from watchdog_fakes import (
    WAIT,
    FakeCatalog,
    FakeReplica,
    R,
    StubReader,
    StubSettings,
    gpu,
    host,
)

A, B, C = (ModelSpec(name=n, backend="fake") for n in "abc")
PINNED = ModelSpec(name="p", backend="fake", pinned=True)
CALM = host(gpu(0, used_gib=4))
HOT = host(gpu(0, used_gib=23))


@dataclass
class Rig:
    clock: FakeClock
    settings: StubSettings
    reader: StubReader
    router: Router
    watchdog: Watchdog
    metrics: Metrics
    made: list[FakeReplica]

    async def route(self, model: str) -> Lease:
        return await self.router.route(model, self.clock.monotonic() + WAIT)

    def replica(self, lease: Lease) -> FakeReplica:
        return next(r for r in self.made if r.id == lease.replica_id)

    async def tick(self) -> list[tuple[str, str]]:
        """One tick; returns (model, reason) of what it evicted, once the stops are done."""
        decisions = await self.watchdog.tick()
        await asyncio.wait_for(self.watchdog.settle(), WAIT)
        return [(d.model, d.reason) for d in decisions]

    def evictions(self, reason: str) -> float | None:
        return self.metrics.registry.get_sample_value("modeld_evictions_total", {"reason": reason})


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    clock = FakeClock()
    settings = StubSettings()
    reader = StubReader(CALM)
    made: list[FakeReplica] = []

    def factory(spec: ModelSpec, gpu_ids: tuple[int, ...], listener: Listener) -> FakeReplica:
        made.append(FakeReplica(f"{spec.name}{len(made)}", spec, gpu_ids, clock, listener))
        return made[-1]

    def admission(evictor: Evictor) -> Admit:
        return Admission(clock=clock, reader=reader, settings=settings, evictor=evictor).admit  # type: ignore[arg-type]

    metrics = Metrics(process=False)
    router = build_router(
        clock=clock,
        catalog=FakeCatalog(A, B, C, PINNED),  # type: ignore[arg-type]
        settings=settings,  # type: ignore[arg-type]
        events=EventBus(),
        factory=factory,
        admission=admission,
        prober=ProbeCache(clock, lambda: 30.0),
        metrics=metrics,
    )
    watchdog = Watchdog(
        clock=clock,
        reader=reader,
        settings=settings,  # type: ignore[arg-type]
        views=router.views,
        observe=router.observe,
        evict=router.evict,
        maintain=router.maintain,
    )
    yield Rig(clock, settings, reader, router, watchdog, metrics, made)
    await watchdog.close()
    await router.close()


# idle


async def test_idle_clock_starts_when_the_last_lease_ends(rig: Rig) -> None:
    rig.settings.current = Settings(idle_timeout=60)
    lease = await rig.route("a")
    rig.clock.advance(100)
    assert await rig.tick() == []
    rig.router.release(lease.id, "OK")
    assert await rig.tick() == []
    rig.clock.advance(59.9)
    assert await rig.tick() == []
    rig.clock.advance(0.1)
    with structlog.testing.capture_logs() as logs:
        assert await rig.tick() == [("a", "idle")]
    assert rig.replica(lease).stops == [("idle", False)]
    assert [(e["event"], e["reason"]) for e in logs if e["event"] == "replica_evicted"] == [
        ("replica_evicted", "idle")
    ]
    assert rig.evictions("idle") == 1.0
    assert await rig.tick() == []


async def test_model_idle_ttl_overrides_the_setting(rig: Rig) -> None:
    rig.router._catalog.specs["a"] = replace(A, idle_ttl=5.0)  # type: ignore[attr-defined]
    rig.settings.current = Settings(idle_timeout=3600)
    rig.router.release((await rig.route("a")).id, "OK")
    rig.router.release((await rig.route("b")).id, "OK")
    rig.clock.advance(5)
    assert await rig.tick() == [("a", "idle")]


async def test_a_replica_routed_to_after_the_decision_is_not_stopped(rig: Rig) -> None:
    rig.settings.current = Settings(idle_timeout=1)
    rig.router.release((await rig.route("a")).id, "OK")
    rig.clock.advance(2)
    decisions = await rig.watchdog.tick()
    assert [d.reason for d in decisions] == ["idle"]
    # The Route runs before the eviction task gets its turn.
    lease = await rig.route("a")
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(rig.watchdog.settle(), WAIT)
    assert rig.replica(lease).stops == [] and rig.replica(lease).in_flight == 1
    assert [e["event"] for e in logs] == ["eviction_dropped"]
    assert rig.evictions("idle") is None


# pinned


async def test_pinned_is_never_evicted_by_idle_lru_or_memory(rig: Rig) -> None:
    rig.settings.current = Settings(idle_timeout=1, max_loaded=1, memory_threshold=0.5)
    rig.reader.set(HOT)
    lease = await rig.route("p")
    rig.router.release(lease.id, "OK")
    rig.clock.advance(3600)
    assert await rig.tick() == []
    with pytest.raises(ResourceExhausted, match=r"held by pinned model\(s\) p"):
        await rig.route("a")
    assert rig.replica(lease).stops == [] and len(rig.made) == 1


# busy timeout and force


async def test_busy_timeout_restarts_the_replica_and_the_next_route_replaces_it(
    rig: Rig,
) -> None:
    rig.settings.current = Settings(busy_timeout=30)
    stuck = await rig.route("a")
    rig.clock.advance(29)
    assert await rig.tick() == []
    rig.clock.advance(1)
    assert await rig.tick() == [("a", "busy_timeout")]
    assert rig.replica(stuck).stops == [("busy_timeout", True)]
    assert rig.replica(stuck).in_flight == 0
    with pytest.raises(NotFound, match="Route again"):
        rig.router.renew(stuck.id)
    assert rig.router.release(stuck.id, "OK") is False
    fresh = await rig.route("a")
    assert fresh.replica_id != stuck.replica_id and fresh.cold_start
    assert rig.evictions("busy_timeout") == 1.0


async def test_forced_eviction_expires_the_victims_leases(rig: Rig) -> None:
    first, second = await rig.route("a"), await rig.route("a")
    victim = rig.replica(first)
    assert victim.in_flight == 2
    await rig.router.evict(Eviction(victim.id, "a", "lru", "test"), True)
    assert victim.stops == [("lru", True)] and victim.in_flight == 0
    for lease in (first, second):
        with pytest.raises(NotFound):
            rig.router.renew(lease.id)
    assert rig.router.leases.expired_total == 2
    assert rig.evictions("lru") == 1.0


# max_loaded through the router


async def test_max_loaded_stops_the_least_recently_used_for_a_new_model(rig: Rig) -> None:
    rig.settings.current = Settings(max_loaded=2)
    a, b = await rig.route("a"), await rig.route("b")
    rig.clock.advance(1)
    rig.router.release(a.id, "OK")
    rig.clock.advance(1)
    rig.router.release(b.id, "OK")
    c = await rig.route("c")
    assert rig.replica(a).stops == [("lru", False)] and rig.replica(b).stops == []
    assert rig.replica(c).state is R.READY
    assert rig.evictions("lru") == 1.0


async def test_capacity_event_is_set_when_a_lease_ends_or_a_replica_stops(rig: Rig) -> None:
    lease = await rig.route("a")
    event = rig.router.capacity_event()
    assert not event.is_set()
    rig.router.release(lease.id, "OK")
    assert event.is_set()
    event = rig.router.capacity_event()
    await rig.router.stopper.stop(rig.replica(lease), "unload", False, None)
    assert event.is_set()


# memory pressure


async def test_memory_pressure_stops_one_per_tick_and_reads_again(rig: Rig) -> None:
    rig.settings.current = Settings(memory_threshold=0.9)
    leases = [await rig.route(m) for m in "ab"]
    for lease in leases:
        rig.clock.advance(1)
        rig.router.release(lease.id, "OK")
    oldest, newer = (rig.replica(lease) for lease in leases)
    oldest.stop_gate = asyncio.Event()
    rig.reader.set(HOT)
    reads = rig.reader.reads
    decisions = await rig.watchdog.tick()
    assert [(d.replica_id, d.reason) for d in decisions] == [(oldest.id, "memory")]
    # While that stop runs, the reading cannot show its effect yet: choose no other.
    assert await rig.watchdog.tick() == []
    assert rig.reader.reads == reads + 2
    oldest.stop_gate.set()
    await asyncio.wait_for(rig.watchdog.settle(), WAIT)
    assert oldest.stops == [("memory", False)]
    assert await rig.tick() == [("b", "memory")]
    rig.reader.set(CALM)
    assert await rig.tick() == [] and newer.stops == [("memory", False)]
    assert rig.evictions("memory") == 2.0


async def test_memory_pressure_leaves_busy_replicas_alone(rig: Rig) -> None:
    rig.settings.current = Settings(memory_threshold=0.9)
    rig.reader.set(HOT)
    lease = await rig.route("a")
    assert await rig.tick() == []
    assert rig.replica(lease).stops == []


async def test_unreadable_resources_still_apply_the_timeouts(rig: Rig) -> None:
    rig.settings.current = Settings(idle_timeout=1, memory_threshold=0.5)
    rig.router.release((await rig.route("a")).id, "OK")
    rig.clock.advance(2)
    rig.reader.error = ValueError("fake resources file: 'ram_total' is missing")
    with structlog.testing.capture_logs() as logs:
        assert await rig.tick() == [("a", "idle")]
        assert await rig.watchdog.tick() == []
    assert [e["event"] for e in logs if e["event"] == "resources_unreadable"] == [
        "resources_unreadable"
    ]


# the loop


async def test_the_loop_ticks_on_the_interval_and_at_once_when_poked() -> None:
    ticks = asyncio.Queue[None]()
    settings = StubSettings(Settings(watchdog_interval=3600))
    watchdog = Watchdog(
        clock=FakeClock(),
        reader=StubReader(),
        settings=settings,  # type: ignore[arg-type]
        views=lambda: ticks.put_nowait(None) or [],  # type: ignore[func-returns-value]
        observe=lambda host, processes: None,
        evict=_never,
        maintain=lambda: None,
    )
    loop = asyncio.ensure_future(watchdog.run())
    try:
        await asyncio.wait_for(ticks.get(), WAIT)
        watchdog.poke()
        await asyncio.wait_for(ticks.get(), WAIT)
        settings.current = Settings(watchdog_interval=0.01)
        watchdog.poke()
        for _ in range(5):
            await asyncio.wait_for(ticks.get(), WAIT)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


async def _never(eviction: Eviction, force: bool) -> None:
    raise AssertionError(f"nothing should be evicted: {eviction}")
