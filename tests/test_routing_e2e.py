"""Routing end to end: the real daemon, real echo backends, real gRPC.

Spawns are counted in the daemon's own registry (every spawn writes a STARTING
event before anything else happens to the replica), and waits on replica
events use WatchEvents with a deadline.
"""

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from daemon_proc import DaemonProc, running_daemon, starts_recorded, wait_pids_gone
from modeld._proto.modeld.v1 import modeld_pb2 as pb

ECHO = '"{python}", "-m", "modeld.backends.echo", "--addr", "{addr}"'
CATALOG = f"""
[backends.echo]
command = [{ECHO}]
stop_grace = "300ms"
[backends.crashy]
command = [{ECHO}, "--start-delay", "0.3", "--exit-on-start", "7"]
[models.duo]
backend = "echo"
max_replicas = 2
[models.short]
backend = "echo"
lease_ttl = "500ms"
[models.cold]
backend = "echo"
max_replicas = 3
[backends.fragile]
command = [{ECHO}]
stop_grace = "300ms"
# A hung backend is proven dead after 3 failed probes spanning at least this.
probe_window = "1s"
[models.fragile]
backend = "fragile"
[models.crashy]
backend = "crashy"
max_replicas = 3
"""
Stream = grpc.aio.UnaryStreamCall  # type: ignore[type-arg]


async def next_event(stream: Stream, match: Callable[[pb.Event], bool], limit_s: float) -> pb.Event:
    async def find() -> pb.Event:
        while True:
            event = await stream.read()
            if event is grpc.aio.EOF:
                raise AssertionError("the event stream ended")
            if match(event):
                return event

    return await asyncio.wait_for(find(), limit_s)


async def replicas(d: DaemonProc, model: str) -> dict[str, pb.Replica]:
    listed = await d.stub.ListReplicas(pb.ListReplicasRequest(model=model))
    return {r.id: r for r in listed.replicas}


async def test_a_thousand_routes_from_50_tasks_leave_every_in_flight_at_0(
    tmp_path: Path,
) -> None:
    async with running_daemon(tmp_path, CATALOG) as d:
        loaded = await d.stub.Load(pb.LoadRequest(model="duo", replicas=2), timeout=30)
        assert len(loaded.replicas) == 2
        used: Counter[str] = Counter()

        async def client() -> None:
            for _ in range(20):
                lease = await d.stub.Route(pb.RouteRequest(model="duo"), timeout=10)
                used[lease.replica_id] += 1
                released = await d.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id))
                assert released.released

        began = time.monotonic()
        await asyncio.gather(*(client() for _ in range(50)))
        elapsed = time.monotonic() - began
        print(f"1000 Route+Release pairs from 50 tasks: {elapsed:.2f}s, spread {dict(used)}")
        assert sum(used.values()) == 1000
        assert set(used) == {r.id for r in loaded.replicas}
        assert min(used.values()) >= 300, used
        listed = await replicas(d, "duo")
        assert {r.in_flight for r in listed.values()} == {0}
        assert {r.state for r in listed.values()} == {pb.READY}


async def test_release_is_idempotent_renew_extends_and_health_probes(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, CATALOG) as d:
        first = await d.stub.Route(pb.RouteRequest(model="duo"), timeout=30)
        second = await d.stub.Route(pb.RouteRequest(model="duo"), timeout=10)
        release = pb.ReleaseRequest(lease_id=first.lease_id)
        assert (await d.stub.Release(release)).released is True
        assert (await d.stub.Release(release)).released is False
        listed = await replicas(d, "duo")
        assert [r.in_flight for r in listed.values()] == [1]

        renewed = await d.stub.RenewLease(pb.RenewLeaseRequest(lease_id=second.lease_id))
        assert renewed.lease_expires_at.ToNanoseconds() > second.lease_expires_at.ToNanoseconds()

        health = await d.stub.Health(pb.HealthRequest(model="duo"))
        (cached,) = health.models[0].replicas
        assert cached.last_probe_ok and cached.in_flight == 1
        again = await d.stub.Health(pb.HealthRequest(model="duo"))
        assert again.models[0].replicas[0].last_probe_at == cached.last_probe_at
        probed = await d.stub.Health(pb.HealthRequest(model="duo", probe=True))
        (now,) = probed.models[0].replicas
        assert now.last_probe_ok
        assert now.last_probe_at.ToNanoseconds() > cached.last_probe_at.ToNanoseconds()


async def test_an_unreleased_lease_expires_and_frees_the_slot(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, CATALOG) as d:
        events = d.stub.WatchEvents(pb.WatchEventsRequest(model="short"))
        lease = await d.stub.Route(pb.RouteRequest(model="short"), timeout=30)
        granted = time.monotonic()
        assert [r.in_flight for r in (await replicas(d, "short")).values()] == [1]
        expired = await next_event(
            events,
            lambda e: e.reason == "lease_expired" and e.replica_id == lease.replica_id,
            limit_s=10,
        )
        waited = time.monotonic() - granted
        events.cancel()
        print(f"lease_ttl 500ms: lease_expired event after {waited * 1000:.0f} ms")
        assert expired.to_state == pb.READY
        # Not before its expiry time, both read on the daemon's clock (which takes the
        # monotonic and the wall time of a grant a few microseconds apart).
        early_ns = lease.lease_expires_at.ToNanoseconds() - expired.time.ToNanoseconds()
        assert early_ns < 1_000_000, f"expired {early_ns / 1e6:.1f} ms early"
        logged = await d.wait_log(lambda e: e.get("event") == "lease_expired")
        assert logged["lease_id"] == lease.lease_id
        assert [r.in_flight for r in (await replicas(d, "short")).values()] == [0]
        released = await d.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id))
        assert released.released is False
        assert [r.in_flight for r in (await replicas(d, "short")).values()] == [0]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await d.stub.RenewLease(pb.RenewLeaseRequest(lease_id=lease.lease_id))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_unreachable_outcome_replaces_a_dead_replica(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, CATALOG) as d:
        lease = await d.stub.Route(pb.RouteRequest(model="fragile"), timeout=30)
        first = lease.replica_id
        pid = (await replicas(d, "fragile"))[first].pid
        unreachable = pb.ReleaseRequest(lease_id=lease.lease_id, outcome=pb.BACKEND_UNREACHABLE)
        assert (await d.stub.Release(unreachable)).released
        health = await d.stub.Health(pb.HealthRequest(model="fragile"))
        assert [(r.state, r.last_probe_ok) for r in health.models[0].replicas] == [
            (pb.READY, True)
        ], "a false report must not stop a healthy replica"

        lease = await d.stub.Route(pb.RouteRequest(model="fragile"), timeout=10)
        assert lease.replica_id == first
        events = d.stub.WatchEvents(pb.WatchEventsRequest(model="fragile"))
        os.kill(pid, signal.SIGSTOP)
        try:
            reported = time.monotonic()
            unreachable = pb.ReleaseRequest(lease_id=lease.lease_id, outcome=pb.BACKEND_UNREACHABLE)
            assert (await d.stub.Release(unreachable)).released
            stopped = await next_event(
                events, lambda e: e.replica_id == first and e.to_state == pb.STOPPED, 20
            )
            print(f"unreachable reported -> STOPPED in {time.monotonic() - reported:.2f}s")
            events.cancel()
            assert stopped.reason.startswith("unreachable")
            assert await wait_pids_gone([pid], 2) == []
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        replaced = await d.stub.Route(pb.RouteRequest(model="fragile"), timeout=30)
        assert replaced.replica_id != first
        assert replaced.cold_start


async def test_fifty_concurrent_cold_routes_spawn_once(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, CATALOG) as d:
        began = time.monotonic()
        leases = await asyncio.gather(
            *(d.stub.Route(pb.RouteRequest(model="cold"), timeout=30) for _ in range(50))
        )
        elapsed = time.monotonic() - began
        print(f"50 concurrent cold Routes: all leased after {elapsed * 1000:.0f} ms")
        assert len({lease.replica_id for lease in leases}) == 1
        assert starts_recorded(tmp_path, "cold") == 1
        listed = await replicas(d, "cold")
        assert [(r.id, r.in_flight) for r in listed.values()] == [(leases[0].replica_id, 50)]
        for lease in leases:
            await d.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id))
        assert [r.in_flight for r in (await replicas(d, "cold")).values()] == [0]


async def test_a_failed_cold_load_fails_every_route_alike_then_backs_off(
    tmp_path: Path,
) -> None:
    async with running_daemon(tmp_path, CATALOG) as d:
        began = time.monotonic()
        calls = [d.stub.Route(pb.RouteRequest(model="crashy"), timeout=30) for _ in range(50)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        start_time = time.monotonic() - began
        errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(errors) == 50
        assert {e.code() for e in errors} == {grpc.StatusCode.UNAVAILABLE}
        details = {e.details() for e in errors}
        assert len(details) == 1
        assert "exiting on purpose with 7" in (details.pop() or "")
        assert starts_recorded(tmp_path, "crashy") == 1

        began = time.monotonic()
        # A deadline shorter than the 1 s backoff: refused at once (a longer one would wait).
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await d.stub.Route(pb.RouteRequest(model="crashy"), timeout=0.5)
        refused = time.monotonic() - began
        print(
            f"backoff refusal in {refused * 1000:.1f} ms (the failed start took {start_time:.2f}s)"
        )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        message = info.value.details() or ""
        assert "backing off after 1 failure(s)" in message
        assert "next attempt at" in message
        assert "exiting on purpose with 7" in message
        # Refused from the backoff without another start.
        assert starts_recorded(tmp_path, "crashy") == 1
        assert len(await replicas(d, "crashy")) == 1
