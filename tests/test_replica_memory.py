"""A replica's memory as the router counts it, against the watchdog's process readings.

A process reading taken while a replica loads is a mid-load figure (seen on an
H200: 30 MiB for a 48 GiB replica right after READY). Until a reading begun
after READY arrives, a replica counts as the larger of the measured value and
its memory estimate, for admission, eviction and the listings alike.
"""

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from modeld.capacity.admission import Evictor
from modeld.capacity.watchdog import Watchdog
from modeld.clock import FakeClock
from modeld.ops.events import EventBus
from modeld.routing.leases import Lease
from modeld.routing.lifecycle import Admit
from modeld.routing.probe import ProbeCache
from modeld.routing.routed import Listener
from modeld.routing.router import Router, build_router
from modeld.spec import ModelSpec, Settings, with_file_estimate
from routing_fakes import FakeReplica
from watchdog_fakes import WAIT, FakeCatalog, StubReader, StubSettings

GIB = 1 << 30
MIB = 1 << 20
PID = 4242
SPEC = ModelSpec(name="big", backend="fake", memory_estimate=48 * GIB)


class HeldReader(StubReader):
    """Reads in a worker thread (as NVML does); a process reading can be held mid-way."""

    blocking = True

    def __init__(self) -> None:
        super().__init__()
        self.reading = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def process_gpu_memory(self) -> dict[int, int]:
        self.reading.set()
        assert self.release.wait(WAIT), "the test never let the reading finish"
        return super().process_gpu_memory()


@dataclass
class Rig:
    clock: FakeClock
    reader: StubReader
    router: Router
    watchdog: Watchdog
    gate: asyncio.Event
    made: asyncio.Event
    # Set by each reading the watchdog hands to the router.
    observed: asyncio.Event

    def memory(self) -> tuple[int, int]:
        """The replica's memory in the views (admission, eviction) and in ListReplicas."""
        [view] = self.router.views()
        [info] = self.router.replicas(SPEC.name)
        return view.memory, info.memory

    async def start(self) -> "asyncio.Future[Lease]":
        """A cold Route whose replica exists (with its pid) but is still loading."""
        route = asyncio.ensure_future(self.router.route(SPEC.name, self.clock.monotonic() + WAIT))
        await asyncio.wait_for(self.made.wait(), WAIT)
        return route


async def _rig(reader: StubReader) -> AsyncIterator[Rig]:
    clock = FakeClock()
    # No periodic tick within a test: a reading comes from a tick the test runs, or
    # from the one READY asks for.
    settings = StubSettings(Settings(watchdog_interval=3600))
    events = EventBus()
    gate = asyncio.Event()
    made = asyncio.Event()
    observed = asyncio.Event()

    def factory(spec: ModelSpec, gpu_ids: tuple[int, ...], listener: Listener) -> FakeReplica:
        made.set()
        return FakeReplica(
            "r0", spec, clock, gpu_ids=(0,), gate=gate, listener=listener, pid=PID, events=events
        )

    def admission(evictor: Evictor) -> Admit:
        async def admit(spec: ModelSpec, deadline: float) -> tuple[int, ...]:
            return (0,)

        return admit

    router = build_router(
        clock=clock,
        catalog=FakeCatalog(SPEC),  # type: ignore[arg-type]
        settings=settings,  # type: ignore[arg-type]
        events=events,
        factory=factory,
        admission=admission,
        prober=ProbeCache(clock, lambda: 30.0),
    )
    watchdog = Watchdog(
        clock=clock,
        reader=reader,
        settings=settings,  # type: ignore[arg-type]
        views=router.views,
        observe=lambda host, processes: (router.observe(host, processes), observed.set()),
        evict=router.evict,
        maintain=router.maintain,
        events=events,
    )
    yield Rig(clock, reader, router, watchdog, gate, made, observed)
    gate.set()
    await watchdog.close()
    await router.close()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async for r in _rig(StubReader()):
        yield r


@pytest.fixture
async def held() -> AsyncIterator[Rig]:
    async for r in _rig(HeldReader()):
        yield r


async def test_a_reading_taken_while_loading_does_not_count_after_ready(rig: Rig) -> None:
    route = await rig.start()
    rig.reader.processes = {PID: 30 * MIB}
    await rig.watchdog.tick()
    assert rig.memory() == (48 * GIB, 48 * GIB), "a loading replica counts its estimate"
    rig.clock.advance(1)
    rig.gate.set()
    await asyncio.wait_for(route, WAIT)
    assert rig.memory() == (48 * GIB, 48 * GIB), "the reading before READY is not final"
    rig.reader.processes = {PID: 47 * GIB}
    rig.clock.advance(1)
    await rig.watchdog.tick()
    assert rig.memory() == (47 * GIB, 47 * GIB), "a reading after READY is the figure"


async def test_a_reading_larger_than_the_estimate_counts_at_once(rig: Rig) -> None:
    route = await rig.start()
    rig.reader.processes = {PID: 50 * GIB}
    await rig.watchdog.tick()
    assert rig.memory() == (50 * GIB, 50 * GIB)
    rig.gate.set()
    await asyncio.wait_for(route, WAIT)
    assert rig.memory() == (50 * GIB, 50 * GIB)


async def test_a_reading_begun_before_ready_and_ended_after_it_is_not_final(held: Rig) -> None:
    route = await held.start()
    reader = held.reader
    assert isinstance(reader, HeldReader)
    reader.processes = {PID: 30 * MIB}
    reader.release.clear()
    tick = asyncio.ensure_future(held.watchdog.tick())
    assert await asyncio.to_thread(reader.reading.wait, WAIT)
    held.clock.advance(1)
    held.gate.set()
    await asyncio.wait_for(route, WAIT)
    reader.release.set()
    await asyncio.wait_for(tick, WAIT)
    assert held.memory() == (48 * GIB, 48 * GIB)
    reader.reading.clear()
    reader.processes = {PID: 47 * GIB}
    held.clock.advance(1)
    await asyncio.wait_for(held.watchdog.tick(), WAIT)
    assert held.memory() == (47 * GIB, 47 * GIB)


async def test_ready_takes_a_reading_at_once_instead_of_waiting_for_the_next_tick(
    rig: Rig,
) -> None:
    running = asyncio.ensure_future(rig.watchdog.run())
    try:
        route = await rig.start()
        rig.reader.processes = {PID: 30 * MIB}
        await rig.watchdog.tick()
        rig.reader.processes = {PID: 47 * GIB}
        rig.clock.advance(1)
        # The run loop's own first tick is over (the reader answers inline) and its next
        # is an hour away: the next reading is the one READY asks for.
        rig.observed.clear()
        rig.gate.set()
        await asyncio.wait_for(route, WAIT)
        await asyncio.wait_for(rig.observed.wait(), WAIT)
        assert rig.memory() == (47 * GIB, 47 * GIB)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


def test_a_gguf_without_an_estimate_counts_its_file_size(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "small.gguf").write_bytes(b"GGUF" + bytes(4092))
    (tmp_path / "weights.bin").write_bytes(bytes(100))
    bare = replace(SPEC, memory_estimate=0, model_file="m/small.gguf")
    assert with_file_estimate(bare, tmp_path).memory_estimate == 4096
    assert with_file_estimate(SPEC, tmp_path) is SPEC, "a given estimate wins"
    other = replace(bare, model_file="weights.bin")
    assert with_file_estimate(other, tmp_path) is other, "only a GGUF's size is its memory"
    missing = replace(bare, model_file="m/gone.gguf")
    assert with_file_estimate(missing, tmp_path) is missing
    outside = replace(bare, model_file="../x.gguf")
    assert with_file_estimate(outside, tmp_path) is outside
