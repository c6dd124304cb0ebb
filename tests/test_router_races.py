"""Interleavings of issue 10, each reproduced deterministically on test replicas.

Every test holds a start, a stop or a probe at a chosen step (events, not sleeps),
then checks what the router did. `turns()` only lets ready callbacks run: it is
never what makes a test pass, only what lets a wrong start show itself.

Fixtures: `h` is a harness over model `m` (max_replicas 2) that admits at once;
`crowded` is one over models a, b and c with max_loaded 1 and the real admission,
so a second model waits in admission while the first is busy.
"""

import asyncio
import gc
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modeld.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from modeld.ops.metrics import Metrics
from modeld.ops.notify import Notifier
from modeld.routing.leases import Lease
from modeld.routing.observer import Observer
from modeld.spec import ModelSpec, Settings
from modeld.state import ReplicaState
from routing_fakes import Harness, router_harness
from watchdog_fakes import StubReader, gpu, host

S = ReplicaState
M = ModelSpec(name="m", backend="echo", max_replicas=2)
WAIT = 5.0


async def turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with router_harness(tmp_path, M) as harness:
        yield harness


@pytest.fixture
async def crowded(tmp_path: Path) -> AsyncIterator[Harness]:
    specs = [ModelSpec(name=n, backend="echo") for n in "abc"]
    reader = StubReader(host(gpu(0, used_gib=1)))
    async with router_harness(
        tmp_path, *specs, settings=Settings(max_loaded=1), reader=reader
    ) as harness:
        yield harness


async def in_admission(h: Harness) -> None:
    """Wait until a start reaches admission (the harness's hook), then let it settle there."""
    await asyncio.wait_for(h.admitting.wait(), WAIT)
    await turns(50)


def route_held_in_admission(h: Harness, model: str = "m") -> "asyncio.Future[Lease]":
    """A cold Route whose start the harness holds in admission (until `admit_gate` is set)."""
    h.admit_gate = asyncio.Event()
    return asyncio.ensure_future(h.router.route(model, h.deadline()))


async def route_waiting_behind_busy(h: Harness) -> tuple[Lease, "asyncio.Future[Lease]"]:
    """In `crowded`: a lease held on a, and a cold Route for b waiting in admission."""
    busy = await h.router.route("a", h.deadline())
    h.admitting.clear()
    waiting = asyncio.ensure_future(h.router.route("b", h.deadline()))
    await in_admission(h)
    return busy, waiting


# defect 1: starts waiting in admission belong to the pool


async def test_close_cancels_a_start_waiting_in_admission_and_spawns_nothing(h: Harness) -> None:
    route = route_held_in_admission(h)
    await in_admission(h)
    await h.router.close()
    assert h.admit_gate is not None
    h.admit_gate.set()
    with pytest.raises(Unavailable, match="shutting down"):
        await asyncio.wait_for(route, WAIT)
    await turns()
    assert h.made == []
    with pytest.raises(Unavailable, match="shutting down"):
        await h.router.route("m", h.deadline())
    assert h.made == []


async def test_unload_cancels_a_start_waiting_in_admission_which_is_listed(h: Harness) -> None:
    route = route_held_in_admission(h)
    await in_admission(h)
    assert [i.state.value for i in h.router.replicas("m")] == ["ADMITTING"]
    assert h.router.has_live("m"), "a pending start keeps DeleteModel away"
    infos = await h.router.unload_model("m", force=False, drain=None)
    assert [i.state.value for i in infos] == ["STOPPED"]
    assert h.admit_gate is not None
    h.admit_gate.set()
    with pytest.raises(Unavailable, match="unload"):
        await asyncio.wait_for(route, WAIT)
    await turns()
    assert h.made == []
    assert not h.router.has_live("m")
    lease = await h.router.route("m", h.deadline())
    assert lease.replica_id == h.made[0].id


# defect 2: Load counts starts waiting in admission


async def test_load_counts_a_cold_start_waiting_in_admission(h: Harness) -> None:
    route = route_held_in_admission(h)
    await in_admission(h)
    load = asyncio.ensure_future(h.router.load("m", 2, h.deadline()))
    await turns()
    assert h.admit_gate is not None
    h.admit_gate.set()
    infos = await asyncio.wait_for(load, WAIT)
    await asyncio.wait_for(route, WAIT)
    assert len(infos) == 2
    assert len(h.made) == 2


async def test_concurrent_loads_never_exceed_max_replicas(h: Harness) -> None:
    h.admit_gate = asyncio.Event()
    loads = [asyncio.ensure_future(h.router.load("m", 2, h.deadline())) for _ in range(2)]
    await turns()
    h.admit_gate.set()
    for load in loads:
        assert len(await asyncio.wait_for(load, WAIT)) == 2
    assert len(h.made) == 2


# defect 3: the pick skips a replica that is being stopped


async def test_route_skips_a_replica_being_stopped(h: Harness) -> None:
    await h.router.load("m", 2, h.deadline())
    busy = await h.router.route("m", h.deadline())
    idle = next(r for r in h.made if r.id != busy.replica_id)
    idle.hold_stop = hold = asyncio.Event()
    stop = asyncio.ensure_future(h.router.unload_replica(idle.id, False, None))
    try:
        await turns()
        assert idle.stop_requested and idle.state is S.READY
        lease = await h.router.route("m", h.deadline())
        assert (lease.replica_id, lease.cold_start) == (busy.replica_id, False)
        assert len(h.made) == 2
    finally:
        hold.set()
    await asyncio.wait_for(stop, WAIT)


# defect 4: a lease expiry is its own kind of event


async def test_lease_expiry_is_read_neither_as_a_probe_nor_as_a_load(tmp_path: Path) -> None:
    async with router_harness(tmp_path, M, settings=Settings(lease_ttl=5)) as h:
        h.router.start()
        lease = await h.router.route("m", h.deadline())
        replica = h.replica(lease.replica_id)
        replica.healthy = False
        await h.router.health(["m"], probe=True)
        seen = h.events.subscribe()
        h.clock.advance(5)
        assert h.router.expire_leases() == 1
        await turns()
        assert [i.last_probe_ok for i in h.router.replicas("m")] == [False]
        metrics = Metrics(process=False)
        observer = Observer(h.events, h.router, metrics, Notifier(None))
        for event in seen.pending():
            observer.on_event(event)
        loads = metrics.registry.get_sample_value(
            "modeld_load_duration_seconds_count", {"backend": "echo"}
        )
        assert not loads


# defect 5: what must happen does not ride on the lossy bus


async def test_a_crash_reaches_the_router_even_when_the_bus_drops_events(
    tmp_path: Path,
) -> None:
    spec = ModelSpec(name="m", backend="echo", max_replicas=1, lease_ttl=1)
    async with router_harness(tmp_path, spec) as h:
        h.router.start()
        for _ in range(2000):
            await h.router.route("m", h.deadline())
        replica = h.made[0]
        h.clock.advance(1)
        assert h.router.expire_leases() == 2000
        capacity = h.router.capacity_event()
        replica.crash()
        await turns()
        assert capacity.is_set()
        assert h.router.pool("m").replicas == {}, "the crashed replica is pruned"


# defect 7: a settings change wakes admission


async def test_raising_max_loaded_wakes_every_route_waiting_in_admission(
    crowded: Harness,
) -> None:
    h = crowded
    await h.router.route("a", h.deadline())
    waiting = [asyncio.ensure_future(h.router.route(m, h.deadline())) for m in "bc"]
    await turns(50)
    assert not any(w.done() for w in waiting)
    await h.settings.update({"max_loaded": 3})
    leases = await asyncio.wait_for(asyncio.gather(*waiting), WAIT)
    assert sorted(lease.model for lease in leases) == ["b", "c"]


async def test_allowing_forced_eviction_wakes_a_route_waiting_in_admission(
    crowded: Harness,
) -> None:
    h = crowded
    busy, waiting = await route_waiting_behind_busy(h)
    assert not waiting.done()
    await h.settings.update({"force_eviction_when_busy": True})
    lease = await asyncio.wait_for(waiting, WAIT)
    assert lease.model == "b"
    assert h.replica(busy.replica_id).stops == ["lru"]


# a cold start whose every caller left: cancelled by its pool, evicts nothing


async def test_a_route_start_whose_caller_left_is_cancelled_and_evicts_nothing(
    crowded: Harness,
) -> None:
    h = crowded
    busy, waiting = await route_waiting_behind_busy(h)
    [start] = h.router.pool("b").pending_tasks()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    h.router.release(busy.id, "OK")
    [outcome] = await asyncio.wait_for(asyncio.gather(start, return_exceptions=True), WAIT)
    assert isinstance(outcome, Unavailable), outcome
    assert "no caller waits for it" in str(outcome)
    assert h.replica(busy.replica_id).stops == []
    assert [r.model for r in h.made] == ["a"]
    assert [i.state.value for i in h.router.replicas("b")] == ["STOPPED"]


async def test_a_route_start_whose_caller_timed_out_evicts_nothing(crowded: Harness) -> None:
    # Not a defect before (admission ends at the first caller's deadline too): a guard.
    h = crowded
    busy = await h.router.route("a", h.deadline())
    h.admitting.clear()
    waiting = asyncio.ensure_future(h.router.route("b", h.deadline(0.3)))
    await in_admission(h)
    starts = h.router.pool("b").pending_tasks()
    h.clock.advance(1.0)  # past the deadline; the real timers fire 0.3 s on
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(waiting, WAIT)
    await asyncio.wait_for(asyncio.gather(*starts, return_exceptions=True), WAIT)
    h.router.release(busy.id, "OK")
    await turns()
    assert h.replica(busy.replica_id).stops == []
    assert [r.model for r in h.made] == ["a"]
    assert h.router.pool("b").pending_tasks() == []


async def test_a_route_start_goes_on_while_a_joined_route_still_waits(crowded: Harness) -> None:
    h = crowded
    busy, first = await route_waiting_behind_busy(h)
    joined = asyncio.ensure_future(h.router.route("b", h.deadline()))
    await turns()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    h.router.release(busy.id, "OK")
    lease = await asyncio.wait_for(joined, WAIT)
    assert (lease.model, lease.cold_start) == ("b", True)
    assert h.replica(busy.replica_id).stops == ["lru"]


@pytest.mark.parametrize("claimed", [False, True], ids=["load-start", "route-start-loaded"])
async def test_a_start_a_load_asked_for_is_not_abandoned_by_its_callers(
    crowded: Harness, claimed: bool
) -> None:
    h = crowded
    busy = await h.router.route("a", h.deadline())
    callers = []
    if claimed:
        h.admitting.clear()
        callers.append(asyncio.ensure_future(h.router.route("b", h.deadline())))
        await in_admission(h)
    h.admitting.clear()
    callers.append(asyncio.ensure_future(h.router.load("b", 1, h.deadline())))
    if not claimed:
        await in_admission(h)
    await turns()
    [start] = h.router.pool("b").pending_tasks()
    for caller in callers:
        caller.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    h.router.release(busy.id, "OK")
    replica = await asyncio.wait_for(start, WAIT)
    assert (replica.model, replica.state) == ("b", S.READY)
    assert h.replica(busy.replica_id).stops == ["lru"]


# defect 8: one probe per suspect replica


async def test_unreachable_reports_share_one_probe_and_a_healthy_replica_keeps_its_leases(
    tmp_path: Path,
) -> None:
    spec = ModelSpec(name="m", backend="echo", max_replicas=1)
    async with router_harness(tmp_path, spec) as h:
        leases = [await h.router.route("m", h.deadline()) for _ in range(6)]
        replica = h.made[0]
        replica.probe_gate = asyncio.Event()
        for lease in leases[:5]:
            assert h.router.release(lease.id, "BACKEND_UNREACHABLE") is True
        await asyncio.wait_for(replica.probing.wait(), WAIT)
        await turns()
        assert replica.probes == 1
        replica.probe_gate.set()
        await turns()
        assert replica.stops == []
        assert replica.in_flight == 1
        h.router.renew(leases[5].id)


# defect 11 (the lease part): bounded leases


async def test_leases_are_capped_per_replica_and_in_total(tmp_path: Path) -> None:
    one = ModelSpec(name="m", backend="echo", max_replicas=1)
    other = ModelSpec(name="n", backend="echo", max_replicas=1)
    async with router_harness(tmp_path, one, other, max_leases_per_replica=2, max_leases=3) as h:
        first = await h.router.route("m", h.deadline())
        await h.router.route("m", h.deadline())
        with pytest.raises(ResourceExhausted, match="max_leases_per_replica = 2"):
            await h.router.route("m", h.deadline())
        h.router.release(first.id, "OK")
        await h.router.route("m", h.deadline())
        await h.router.route("n", h.deadline())
        with pytest.raises(ResourceExhausted, match="max_leases = 3"):
            await h.router.route("n", h.deadline())
        assert sum(r.in_flight for r in h.made) == 3


# issue 11, defect 3: no coroutine left unawaited by a refused Load


async def test_a_refused_load_leaves_no_unawaited_coroutine(h: Harness) -> None:
    await h.router.route("m", h.deadline())
    h.scripts["m"] = [{"fail": "boom"}]
    with pytest.raises(Unavailable, match="boom"):
        await h.router.load("m", 2, h.deadline())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # A deadline that ends before the backoff does: refused at once.
            await h.router.load("m", 2, h.deadline(0.5))
        except Unavailable as exc:
            assert "backing off" in str(exc)
        else:
            raise AssertionError("a load during backoff must be refused")
        gc.collect()
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == []
