"""Admission on a fake clock, fake readings and a fake evictor: what stops, what waits."""

import asyncio
from dataclasses import replace

import pytest

from modeld.capacity.admission import Admission
from modeld.clock import FakeClock
from modeld.errors import DeadlineExceeded, ResourceExhausted
from modeld.policy.view import ReplicaView
from modeld.spec import ModelSpec, Settings
from watchdog_fakes import (
    GIB,
    WAIT,
    FakeEvictor,
    R,
    StubReader,
    StubSettings,
    busy,
    gpu,
    host,
    view,
)

NEW = ModelSpec(name="new", backend="echo")


def admission(
    evictor: FakeEvictor, settings: Settings, reader: StubReader | None = None
) -> tuple[Admission, FakeClock]:
    clock = FakeClock()
    adm = Admission(
        clock=clock,
        reader=reader or StubReader(host(gpu(0, 0), gpu(1, 0))),
        settings=StubSettings(settings),  # type: ignore[arg-type]
        evictor=evictor,
        freed_reads=5,
        freed_interval=0.001,
    )
    return adm, clock


def evicted(evictor: FakeEvictor) -> list[tuple[str, str, bool]]:
    return [(e.replica_id, e.reason, force) for e, force in evictor.evicted]


async def test_room_admits_at_once_on_the_gpu_with_most_free_memory() -> None:
    reader = StubReader(host(gpu(0, used_gib=10), gpu(1, used_gib=4)))
    adm, clock = admission(FakeEvictor([view("a")]), Settings(max_loaded=2), reader)
    assert await adm.admit(NEW, clock.monotonic() + WAIT) == (1,)


async def test_no_gpus_means_no_gpu_ids() -> None:
    adm, clock = admission(FakeEvictor(), Settings(), StubReader(host()))
    assert await adm.admit(NEW, clock.monotonic() + WAIT) == ()


async def test_placement_subtracts_what_loading_replicas_will_take() -> None:
    reader = StubReader(host(gpu(0, used_gib=10), gpu(1, used_gib=4)))
    # 6 GiB more free on GPU 1, but a load in progress there will take 8 GiB.
    loading = view("l", state=R.LOADING, gpu_ids=(1,), memory=8 * GIB)
    adm, clock = admission(FakeEvictor([loading]), Settings(), reader)
    assert await adm.admit(NEW, clock.monotonic() + WAIT) == (0,)
    pinned = replace(NEW, gpu_ids=(1,))
    assert await adm.admit(pinned, clock.monotonic() + WAIT) == (1,)


async def test_lru_stops_the_least_recently_used_idle_replica_first() -> None:
    evictor = FakeEvictor([view("a", last_used=500.0), view("b", last_used=400.0)])
    adm, clock = admission(evictor, Settings(max_loaded=2))
    await adm.admit(NEW, clock.monotonic() + WAIT)
    assert evicted(evictor) == [("b", "lru", False)]


async def test_lru_skips_busy_replicas_and_waits_until_a_lease_ends() -> None:
    evictor = FakeEvictor([busy("a", last_used=100.0), view("b", last_used=800.0)])
    adm, clock = admission(evictor, Settings(max_loaded=1))
    task = asyncio.ensure_future(adm.admit(NEW, clock.monotonic() + WAIT))
    await asyncio.wait_for(evictor.waiting.wait(), WAIT)
    # Stopping "b" alone would not make room, so nothing is stopped while "a" is busy.
    assert evictor.evicted == [] and not task.done()
    evictor.update(view("a", last_used=900.0))
    evictor.signal()
    assert await asyncio.wait_for(task, WAIT) == (0,)
    assert evicted(evictor) == [("b", "lru", False), ("a", "lru", False)]


async def test_a_victim_routed_to_after_the_plan_is_spared_and_waited_for() -> None:
    class Racing(FakeEvictor):
        """A Route leases "a" right after admission has read the views to plan."""

        planned = False

        def views(self) -> list[ReplicaView]:
            out = super().views()
            if not self.planned:
                self.planned = True
                self.replicas["a"] = busy("a")
            return out

    evictor = Racing([view("a")])
    adm, clock = admission(evictor, Settings(max_loaded=1))
    task = asyncio.ensure_future(adm.admit(NEW, clock.monotonic() + WAIT))
    await asyncio.wait_for(evictor.waiting.wait(), WAIT)
    assert evictor.evicted == []
    evictor.update(view("a"))
    evictor.signal()
    assert await asyncio.wait_for(task, WAIT) == (0,)
    assert evicted(evictor) == [("a", "lru", False)]


async def test_waiting_survives_many_lease_changes_that_leave_it_busy() -> None:
    evictor = FakeEvictor([busy("a")])
    adm, clock = admission(evictor, Settings(max_loaded=1))
    task = asyncio.ensure_future(adm.admit(NEW, clock.monotonic() + 10 * WAIT))
    for _ in range(50):
        await asyncio.wait_for(evictor.waiting.wait(), WAIT)
        evictor.signal()
    await asyncio.wait_for(evictor.waiting.wait(), WAIT)
    assert not task.done()
    evictor.update(view("a"))
    evictor.signal()
    assert await asyncio.wait_for(task, WAIT) == (0,)
    assert evicted(evictor) == [("a", "lru", False)]


async def test_waiting_ends_at_the_deadline_saying_what_it_waited_for() -> None:
    evictor = FakeEvictor([busy("a", "llama")])
    adm, clock = admission(evictor, Settings(max_loaded=1))
    with pytest.raises(DeadlineExceeded, match=r"max_loaded 1 reached: waiting for 1"):
        await adm.admit(NEW, clock.monotonic() + 0.05)
    clock.advance(1)
    with pytest.raises(DeadlineExceeded):
        await adm.admit(NEW, clock.monotonic() - 1)
    assert evictor.evicted == []


async def test_force_eviction_when_busy_takes_the_busy_replica_by_force() -> None:
    evictor = FakeEvictor([busy("a")])
    adm, clock = admission(evictor, Settings(max_loaded=1, force_eviction_when_busy=True))
    await adm.admit(NEW, clock.monotonic() + WAIT)
    assert evicted(evictor) == [("a", "lru", True)]


async def test_all_pinned_fails_at_once_naming_the_pinned_models() -> None:
    evictor = FakeEvictor([view("a", "llama", pinned=True), view("b", "whisper", pinned=True)])
    adm, clock = admission(evictor, Settings(max_loaded=2))
    with pytest.raises(ResourceExhausted) as info:
        await adm.admit(NEW, clock.monotonic() + WAIT)
    assert "cannot start model 'new': max_loaded 2 reached" in str(info.value)
    assert "pinned model(s) llama, whisper" in str(info.value)
    assert evictor.evicted == [] and not evictor.waiting.is_set()


async def test_infeasible_load_evicts_nothing_and_says_the_numbers() -> None:
    replicas = [
        view("small", memory=2 * GIB),
        view("big", "llama", memory=14 * GIB, pinned=True),
    ]
    evictor = FakeEvictor(replicas)
    reader = StubReader(host(gpu(0, used_gib=20)))
    adm, clock = admission(evictor, Settings(max_loaded=3), reader)
    spec = replace(NEW, memory_estimate=8 * GIB)
    with pytest.raises(ResourceExhausted) as info:
        await adm.admit(spec, clock.monotonic() + WAIT)
    assert str(info.value) == (
        "cannot start model 'new': model 'new' needs 8.0 GiB on GPU 0 (Fake), which cannot "
        "be made available: free 4.0 GiB, evictable 2.0 GiB (held by pinned model(s) llama)"
    )
    assert evictor.evicted == []


async def test_groups_stop_the_conflicting_model() -> None:
    evictor = FakeEvictor([view("a", "sd", groups=("image",)), view("b", "llm", groups=("t",))])
    adm, clock = admission(evictor, Settings())
    await adm.admit(replace(NEW, groups=("image",)), clock.monotonic() + WAIT)
    assert evicted(evictor) == [("a", "group", False)]
    assert evictor.evicted[0][0].detail == "shares concurrency group(s) image with new"


async def test_pinned_group_conflict_fails_with_a_clear_message() -> None:
    evictor = FakeEvictor([view("a", "sd", groups=("image",), pinned=True)])
    adm, clock = admission(evictor, Settings())
    with pytest.raises(ResourceExhausted, match=r"with pinned model\(s\) sd; unpin or unload"):
        await adm.admit(replace(NEW, groups=("image",)), clock.monotonic() + WAIT)
    assert evictor.evicted == []


async def test_after_a_memory_eviction_the_freed_memory_is_read_before_placing() -> None:
    evictor = FakeEvictor([view("a", memory=8 * GIB), view("b", memory=4 * GIB, gpu_ids=(1,))])
    full, freed = host(gpu(0, used_gib=22), gpu(1, 23)), host(gpu(0, used_gib=14), gpu(1, 23))
    # The driver reports the memory as free two reads after the stop.
    reader = StubReader(full, full, full, freed)
    adm, clock = admission(evictor, Settings(), reader)
    spec = replace(NEW, memory_estimate=8 * GIB)
    assert await adm.admit(spec, clock.monotonic() + WAIT) == (0,)
    assert evicted(evictor) == [("a", "memory", False)]
    # One read to plan, three until the memory showed as free, one to plan again.
    assert reader.reads == 5


async def test_freed_memory_is_awaited_for_a_bounded_time_only() -> None:
    evictor = FakeEvictor([view("a", memory=8 * GIB)])
    reader = StubReader(host(gpu(0, used_gib=22)))
    adm, clock = admission(evictor, Settings(), reader)
    with pytest.raises(ResourceExhausted, match=r"free 2.0 GiB, evictable 0.0 MiB"):
        await adm.admit(replace(NEW, memory_estimate=8 * GIB), clock.monotonic() + WAIT)
    # Plan, five re-reads (freed_reads), plan again: the still-full GPU refuses the load.
    assert reader.reads == 7
    assert evicted(evictor) == [("a", "memory", False)]
