"""The router on a fake clock with fake replicas: leases, expiry, coalescing, backoff,
scale-out, suspects and cached health probes (start backoff: test_pool_backoff.py)."""

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from modeld.errors import NotFound, Unavailable
from modeld.ops.events import LEASE_EXPIRED
from modeld.spec import ModelSpec, Settings
from modeld.state import ReplicaState
from routing_fakes import router_harness, settle

S = ReplicaState
M = ModelSpec(name="m", backend="echo", max_replicas=2)


async def test_lease_expires_after_its_ttl_and_frees_the_slot(tmp_path: Path) -> None:
    async with router_harness(tmp_path, M, settings=Settings(lease_ttl=600)) as h:
        events = h.events.subscribe("m")
        lease = await h.router.route("m", h.deadline())
        replica = h.replica(lease.replica_id)
        assert lease.expires == h.clock.monotonic() + 600
        h.clock.advance(599.9)
        assert h.router.expire_leases() == 0
        assert replica.in_flight == 1
        h.clock.advance(0.1)
        assert h.router.expire_leases() == 1
        assert replica.in_flight == 0
        assert h.router.leases.expired_total == 1
        expiries = [
            (event.replica_id, event.reason, event.to_state)
            for event in events.pending()
            if event.kind == LEASE_EXPIRED
        ]
        assert expiries == [(replica.id, "lease_expired", S.READY)]
        assert h.router.release(lease.id, "OK") is False
        assert replica.in_flight == 0
        with pytest.raises(NotFound, match="Route again"):
            h.router.renew(lease.id)
        assert h.router.expire_leases() == 0


async def test_a_model_lease_ttl_overrides_the_setting(tmp_path: Path) -> None:
    spec = ModelSpec(name="short", backend="echo", lease_ttl=0.5)
    async with router_harness(tmp_path, spec, settings=Settings(lease_ttl=600)) as h:
        lease = await h.router.route("short", h.deadline())
        assert lease.ttl == 0.5
        h.clock.advance(0.5)
        assert h.router.expire_leases() == 1


async def test_renew_pushes_the_expiry_out(tmp_path: Path) -> None:
    async with router_harness(tmp_path, M, settings=Settings(lease_ttl=600)) as h:
        lease = await h.router.route("m", h.deadline())
        first = lease.expires_wall
        h.clock.advance(400)
        assert h.router.renew(lease.id) == first + 400
        h.clock.advance(300)
        assert h.router.expire_leases() == 0
        h.clock.advance(300)
        assert h.router.expire_leases() == 1


async def test_release_is_idempotent_and_in_flight_never_negative(tmp_path: Path) -> None:
    async with router_harness(tmp_path, ModelSpec(name="m", backend="echo")) as h:
        first = await h.router.route("m", h.deadline())
        second = await h.router.route("m", h.deadline())
        replica = h.replica(first.replica_id)
        assert replica.in_flight == 2
        assert h.router.release(first.id, "OK") is True
        assert h.router.release(first.id, "OK") is False
        assert replica.in_flight == 1
        assert h.router.release(second.id, "OK") is True
        assert h.router.release(second.id, "OK") is False
        assert h.router.release("never-granted", "OK") is False
        assert replica.in_flight == 0


async def test_concurrent_cold_routes_share_one_start(tmp_path: Path) -> None:
    spec = ModelSpec(name="m", backend="echo", max_replicas=3)
    async with router_harness(tmp_path, spec) as h:
        leases = await asyncio.gather(*(h.router.route("m", h.deadline()) for _ in range(50)))
        assert len(h.made) == 1
        assert h.admitted == ["m"]
        assert {lease.replica_id for lease in leases} == {h.made[0].id}
        assert h.made[0].in_flight == 50
        assert sum(lease.cold_start for lease in leases) == 50


async def test_a_start_cut_short_by_a_stop_does_not_back_off(tmp_path: Path) -> None:
    async with router_harness(tmp_path, M) as h:
        gate = asyncio.Event()
        h.scripts["m"] = [{"gate": gate}]
        start = h.router.lifecycle.start(h.router.pool("m"), M, h.deadline())
        route = asyncio.ensure_future(h.router.route("m", h.deadline()))
        replica = await h.made_replica(1)
        await h.router.unload_model("m", force=True, drain=0)
        gate.set()
        for waiter in (start, route):
            with pytest.raises(Unavailable, match="stopped while starting"):
                await waiter
        assert h.router.pool("m").backoff is None
        lease = await h.router.route("m", h.deadline())
        assert lease.replica_id != replica.id


async def test_scale_out_starts_one_replica_when_every_one_is_at_parallel(
    tmp_path: Path,
) -> None:
    async with router_harness(tmp_path, replace(M, parallel=2)) as h:
        pool = h.router.pool("m")
        first = await h.router.route("m", h.deadline())
        second = await h.router.route("m", h.deadline())
        assert second.replica_id == first.replica_id
        assert pool.pending() == 0, "a replica with room left must not scale out"
        gate = asyncio.Event()
        h.scripts["m"] = [{"gate": gate}]
        waiting = [asyncio.ensure_future(h.router.route("m", h.deadline())) for _ in range(5)]
        added = await h.made_replica(2)
        assert h.router.queues.waiting("m") == 5
        assert pool.planned() == 2, "one start for the whole shortage"
        gate.set()
        served = [await w for w in waiting[:2]]
        assert {lease.replica_id for lease in served} == {added.id}
        assert not any(w.done() for w in waiting[2:]), "max_replicas reached: they queue"
        assert len(h.made) == 2
        h.router.release(first.id, "OK")
        assert (await waiting[2]).replica_id == first.replica_id
        for lease in [second, *served, await waiting[2]]:
            h.router.release(lease.id, "OK")
        await asyncio.gather(*waiting)
        assert len(h.made) == 2


async def test_scale_out_is_off_without_parallel(tmp_path: Path) -> None:
    async with router_harness(tmp_path, M) as h:
        for _ in range(5):
            await h.router.route("m", h.deadline())
        assert h.router.pool("m").pending() == 0
        assert len(h.made) == 1


async def test_unreachable_replica_is_avoided_while_probed_and_stopped_when_its_port_refuses(
    tmp_path: Path,
) -> None:
    async with router_harness(tmp_path, M) as h:
        await h.router.load("m", 2, h.deadline())
        lease = await h.router.route("m", h.deadline())
        suspect = h.replica(lease.replica_id)
        other = next(r for r in h.made if r is not suspect)
        suspect.healthy = False
        suspect.refusing = True
        suspect.probe_gate = asyncio.Event()
        assert h.router.release(lease.id, "BACKEND_UNREACHABLE") is True
        health = asyncio.ensure_future(h.router.health(["m"], probe=False))
        await asyncio.wait_for(suspect.probing.wait(), 1)
        picks = [await h.router.route("m", h.deadline()) for _ in range(3)]
        assert {p.replica_id for p in picks} == {other.id}
        suspect.probe_gate.set()
        await asyncio.wait_for(suspect.stopped.wait(), 1)
        assert suspect.stops == ["unreachable: its port refuses connections (fake:m-0)"]
        assert suspect.probes == 1, "Health and the suspect check share one probe"
        report = await health
        assert [i.last_probe_ok for i in report["m"] if i.id == suspect.id] == [False]


async def test_a_replica_that_does_not_answer_is_dead_only_after_failures_over_the_window(
    tmp_path: Path,
) -> None:
    """Finding 1 of issue 21: one failed probe used to stop a busy replica at once."""
    async with router_harness(tmp_path, M) as h:
        lease = await h.router.route("m", h.deadline())
        replica = h.replica(lease.replica_id)
        replica.healthy = False
        h.router.release(lease.id, "BACKEND_UNREACHABLE")
        window = replica.backend.probe_window
        while replica.probes < replica.backend.probe_failures:
            await asyncio.wait_for(replica.probing.wait(), 1)
            replica.probing.clear()
            [info] = h.router.replicas("m")
            assert (info.state, replica.stops) == (S.READY, [])
            assert info.suspect == "a client reported it unreachable"
            h.clock.advance(1.0)
        # Enough failures, but not yet over probe_window: still only suspect.
        assert replica.probes == replica.backend.probe_failures
        h.clock.advance(window)
        await asyncio.wait_for(replica.stopped.wait(), 1)
        assert len(replica.stops) == 1
        assert replica.stops[0].startswith("unreachable: ")
        assert "probes in a row failed" in replica.stops[0]


async def test_a_replica_holding_leases_is_busy_not_dead_while_its_port_accepts(
    tmp_path: Path,
) -> None:
    """A real server under a long queue fails probe after probe (make test-real saw 3
    over 10.8 s): while it holds leases, that is no evidence; once it holds none, it is."""
    async with router_harness(tmp_path, M) as h:
        held = await h.router.route("m", h.deadline())
        reported = await h.router.route("m", h.deadline())
        replica = h.replica(held.replica_id)
        assert reported.replica_id == replica.id
        replica.healthy = False
        h.router.release(reported.id, "BACKEND_UNREACHABLE")
        for _ in range(2 * replica.backend.probe_failures):
            await asyncio.wait_for(replica.probing.wait(), 1)
            replica.probing.clear()
            h.clock.advance(replica.backend.probe_window)
        [info] = h.router.replicas("m")
        assert (info.state, info.suspect, replica.stops) == (
            S.READY,
            "a client reported it unreachable",
            [],
        )
        h.router.release(held.id, "OK")
        stopped = asyncio.ensure_future(replica.stopped.wait())
        for _ in range(2 * replica.backend.probe_failures):
            probed = asyncio.ensure_future(replica.probing.wait())
            await asyncio.wait([stopped, probed], timeout=1, return_when=asyncio.FIRST_COMPLETED)
            probed.cancel()
            if stopped.done():
                break
            replica.probing.clear()
            h.clock.advance(replica.backend.probe_window)
        await asyncio.wait_for(stopped, 1)
        assert len(replica.stops) == 1 and "probes in a row failed" in replica.stops[0]


async def test_unreachable_report_on_a_healthy_replica_keeps_it(tmp_path: Path) -> None:
    async with router_harness(tmp_path, M) as h:
        lease = await h.router.route("m", h.deadline())
        replica = h.replica(lease.replica_id)
        h.router.release(lease.id, "BACKEND_UNREACHABLE")
        report = await h.router.health(["m"], probe=False)
        assert [(i.state, i.last_probe_ok) for i in report["m"]] == [(S.READY, True)]
        assert replica.stops == []
        assert (await h.router.route("m", h.deadline())).replica_id == replica.id


async def test_health_reuses_fresh_probes_and_probes_on_request(tmp_path: Path) -> None:
    async with router_harness(tmp_path, M, settings=Settings(probe_ttl=30)) as h:
        lease = await h.router.route("m", h.deadline())
        replica = h.replica(lease.replica_id)
        # Becoming READY was a healthy probe: it is reused until probe_ttl.
        await h.router.health(["m"], probe=False)
        await h.router.health(["m"], probe=False)
        assert replica.probes == 0
        h.clock.advance(29)
        await h.router.health(["m"], probe=False)
        assert replica.probes == 0
        h.clock.advance(1)
        await h.router.health(["m"], probe=False)
        assert replica.probes == 1
        await h.router.health(["m"], probe=False)
        assert replica.probes == 1
        report = await h.router.health(["m"], probe=True)
        assert replica.probes == 2
        assert report["m"][0].last_probe_at == h.clock.wall()
        assert report["m"][0].in_flight == 1


async def test_a_failed_probe_is_never_reused(tmp_path: Path) -> None:
    async with router_harness(tmp_path, M) as h:
        lease = await h.router.route("m", h.deadline())
        replica = h.replica(lease.replica_id)
        replica.healthy = False
        h.clock.advance(30)  # past the readiness probe's probe_ttl
        for expected in (1, 2, 3):
            report = await h.router.health(["m"], probe=False)
            assert report["m"][0].last_probe_ok is False
            assert replica.probes == expected


async def test_min_replicas_are_not_over_started(tmp_path: Path) -> None:
    spec = ModelSpec(name="m", backend="echo", min_replicas=2, max_replicas=3)
    async with router_harness(tmp_path, spec) as h:
        gate = asyncio.Event()
        h.scripts["m"] = [{"gate": gate}, {"gate": gate}]
        first = h.router.maintain()
        assert len(first) == 2
        assert h.router.maintain() == [], "starts in admission count"
        await h.made_replica(2)
        assert h.router.maintain() == [], "starting replicas count"
        gate.set()
        await settle(first)
        assert h.router.maintain() == []
        assert len(h.made) == 2
