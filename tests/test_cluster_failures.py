"""Cluster behaviour with real PostgreSQL and real daemons: where Routes land,
and what kill -9, SIGSTOP, a database outage and a killed LISTEN connection do.

Host TTL is 2 s (cluster_proc.HOST_TTL), so each test takes a few seconds.
"""

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest

from cluster_proc import HOST_TTL, db_rows, running_cluster, start_host
from daemon_proc import DaemonProc
from faultproxy import FaultProxy
from modeld._proto.modeld.v1 import modeld_pb2 as pb

pytestmark = pytest.mark.timeout(90)


def after(daemon: DaemonProc, match: Callable[[dict[str, Any]], bool]) -> Callable[..., Any]:
    """A log matcher that only accepts lines logged from now on."""
    seen = {id(e) for e in daemon.log}
    return lambda e: id(e) not in seen and match(e)


def sees_ready(host: str, replica_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: (
        e.get("event") == "cluster_view_changed" and f"{host}/{replica_id}" in e.get("ready", [])
    )


def event(name: str, **fields: object) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("event") == name and all(e.get(k) == v for k, v in fields.items())


async def load_on(via: DaemonProc, host: str, model: str = "echo") -> pb.Replica:
    reply = await via.stub.Load(pb.LoadRequest(model=model, host=host), timeout=30)
    assert len(reply.replicas) == 1
    replica: pb.Replica = reply.replicas[0]
    return replica


async def test_routes_land_on_the_owner_then_kill9_fails_over(tmp_path: Path, pg_dsn: str) -> None:
    async with running_cluster(tmp_path, pg_dsn, ["a", "b", "c"]) as hosts:
        a, b, c = hosts["a"], hosts["b"], hosts["c"]
        replica = await load_on(a, "b")
        for name in ("a", "c"):
            await hosts[name].wait_log(sees_ready("b", replica.id), 10)
        leases = {}
        for name, daemon in hosts.items():
            reply = await daemon.stub.Route(pb.RouteRequest(model="echo"), timeout=10)
            assert reply.replica_id == replica.id, name
            assert reply.address == replica.address
            assert reply.lease_id.startswith("b~")
            assert reply.owner_address == b.addr
            assert not reply.cold_start
            leases[name] = reply.lease_id
        # Leases are held by the owner: renew and release them from any modeld.
        await c.stub.RenewLease(pb.RenewLeaseRequest(lease_id=leases["a"]), timeout=5)
        released = await c.stub.Release(pb.ReleaseRequest(lease_id=leases["a"]), timeout=5)
        assert released.released
        again = await a.stub.Release(pb.ReleaseRequest(lease_id=leases["a"]), timeout=5)
        assert not again.released

        # kill -9 of host b, and of its backend (a dead host takes its backends along).
        b.proc.kill()
        os.kill(replica.pid, signal.SIGKILL)
        await b.proc.wait()
        lost = await a.stub.Release(pb.ReleaseRequest(lease_id=leases["c"]), timeout=10)
        assert not lost.released
        for daemon in (a, c):
            reply = await daemon.stub.Route(pb.RouteRequest(model="echo"), timeout=30)
            assert reply.replica_id != replica.id
            assert reply.lease_id.startswith(("a~", "c~"))
        reaped = [
            asyncio.ensure_future(d.wait_log(event("cluster_host_reaped", host_id="b"), 15))
            for d in (a, c)
        ]
        done, pending = await asyncio.wait(reaped, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        assert all(task.exception() is None for task in done)
        assert await db_rows(pg_dsn, "SELECT * FROM modeld_hosts WHERE host_id = 'b'") == []
        assert await db_rows(pg_dsn, "SELECT * FROM modeld_replicas WHERE host_id = 'b'") == []
        # Once reaped, nothing of b is left in the survivors' views either.
        for daemon in (a, c):
            view = await daemon.wait_log(
                lambda e: e.get("event") == "cluster_view_changed" and "b" not in e["hosts"], 10
            )
            assert not any(r.startswith("b/") for r in view["ready"])


async def test_sigstop_past_ttl_is_fenced_and_reregisters(tmp_path: Path, pg_dsn: str) -> None:
    async with running_cluster(tmp_path, pg_dsn, ["a", "b"]) as hosts:
        a, b = hosts["a"], hosts["b"]
        replica = await load_on(b, "b")
        await a.wait_log(sees_ready("b", replica.id), 10)
        registered = await b.wait_log(event("cluster_registered"), 5)
        reaped = after(a, event("cluster_host_reaped", host_id="b"))
        b.proc.send_signal(signal.SIGSTOP)
        reregistered = after(b, event("cluster_registered"))
        try:
            await a.wait_log(reaped, 4 * HOST_TTL + 5)
            # Matched from here on: b is gone from a's view once reaped.
            seen_again = after(a, sees_ready("b", replica.id))
        finally:
            b.proc.send_signal(signal.SIGCONT)
        again = await b.wait_log(reregistered, 10)
        assert again["epoch"] > registered["epoch"]
        assert again["replicas"] == 1
        await a.wait_log(seen_again, 10)
        rows = await db_rows(pg_dsn, "SELECT replica_id, epoch FROM modeld_replicas")
        assert [(r["replica_id"], r["epoch"]) for r in rows] == [(replica.id, again["epoch"])]
        reply = await a.stub.Route(pb.RouteRequest(model="echo"), timeout=10)
        assert reply.replica_id == replica.id and reply.lease_id.startswith("b~")


async def test_database_outage_keeps_warm_routes(tmp_path: Path, pg_dsn: str) -> None:
    target = urlsplit(pg_dsn)
    proxy = await FaultProxy.start(target.hostname or "127.0.0.1", target.port or 5432)
    try:
        dsn = proxy.dsn(pg_dsn)
        async with running_cluster(tmp_path, dsn, ["a", "b"]) as hosts:
            a, b = hosts["a"], hosts["b"]
            replica = await load_on(b, "b")
            await a.wait_log(sees_ready("b", replica.id), 10)
            down = [after(d, event("cluster_db_down")) for d in (a, b)]
            up = [after(d, event("cluster_db_up")) for d in (a, b)]
            registered = after(b, event("cluster_registered"))
            seen_again = after(a, sees_ready("b", replica.id))
            proxy.cut()
            await asyncio.gather(a.wait_log(down[0], 10), b.wait_log(down[1], 10))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await a.stub.Load(pb.LoadRequest(model="echo"), timeout=10)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "cluster database" in (refused.value.details() or "")
            ok = failed = 0
            # Longer than one TTL: every host's lease runs out in the database meanwhile.
            loop = asyncio.get_running_loop()
            until = loop.time() + 2 * HOST_TTL
            while loop.time() < until or ok + failed < 200:
                try:
                    reply = await a.stub.Route(pb.RouteRequest(model="echo"), timeout=5)
                    assert reply.replica_id == replica.id
                    await a.stub.Release(pb.ReleaseRequest(lease_id=reply.lease_id), timeout=5)
                    ok += 1
                except grpc.aio.AioRpcError:
                    failed += 1
            assert ok / (ok + failed) >= 0.99, (ok, failed)
            proxy.restore()
            await asyncio.gather(a.wait_log(up[0], 15), b.wait_log(up[1], 15))
            # b's lease expired during the outage: it re-registers, and nobody reaps it.
            await b.wait_log(registered, 10)
            await a.wait_log(seen_again, 10)
            reply = await a.stub.Route(pb.RouteRequest(model="echo"), timeout=5)
            assert reply.replica_id == replica.id
            for daemon in (a, b):
                assert not [e for e in daemon.log if e.get("event") == "cluster_host_reaped"]
    finally:
        await proxy.close()


async def test_killed_listen_connection_reconnects_and_misses_nothing(
    tmp_path: Path, pg_dsn: str
) -> None:
    async with running_cluster(tmp_path, pg_dsn, ["a", "b"]) as hosts:
        a, b = hosts["a"], hosts["b"]
        lost = after(a, event("cluster_listen_lost"))
        listening = after(a, event("cluster_listening"))
        killed = await db_rows(
            pg_dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'modeld-listen/a' AND datname = current_database()",
        )
        assert [r[0] for r in killed] == [True]
        await a.wait_log(lost, 10)
        # Changed while a may not be listening: the resync after reconnecting must see it.
        replica = await load_on(b, "b")
        await a.wait_log(listening, 10)
        await a.wait_log(sees_ready("b", replica.id), 10)
        reply = await a.stub.Route(pb.RouteRequest(model="echo"), timeout=10)
        assert reply.replica_id == replica.id


async def test_owner_checks_replica_identity_before_leasing(tmp_path: Path, pg_dsn: str) -> None:
    a = await start_host(tmp_path, pg_dsn, "a")
    try:
        replica = await load_on(a, "a")
        md = (("modeld-forwarded", f"{replica.id}:{replica.restarts}"),)
        reply = await a.stub.Route(pb.RouteRequest(model="echo"), metadata=md, timeout=10)
        assert reply.lease_id.startswith("a~") and reply.replica_id == replica.id
        for marker in (f"{replica.id}:{replica.restarts + 1}", "feedfacecafe:0"):
            with pytest.raises(grpc.aio.AioRpcError) as stale:
                await a.stub.Route(
                    pb.RouteRequest(model="echo"),
                    metadata=(("modeld-forwarded", marker),),
                    timeout=10,
                )
            assert stale.value.code() is grpc.StatusCode.NOT_FOUND
            assert "route elsewhere" in (stale.value.details() or "")
    finally:
        await a.stop()


async def in_flight(nodes: list[DaemonProc], model: str = "echo") -> list[int]:
    counts = []
    for node in nodes:
        reply = await node.stub.ListReplicas(pb.ListReplicasRequest(model=model), timeout=5)
        counts.append(sum(r.in_flight for r in reply.replicas))
    return counts


async def test_router_role_spreads_leases_over_three_hosts(tmp_path: Path, pg_dsn: str) -> None:
    # max_replicas counts the whole cluster: three replicas need a model allowing three.
    spread = '[models.spread]\nbackend = "echo"\nmax_replicas = 3\n'
    async with running_cluster(tmp_path, pg_dsn, ["a", "b", "c"], extra=spread) as hosts:
        r = await start_host(tmp_path, pg_dsn, "r", extra='role = "router"\n' + spread)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await r.stub.Load(pb.LoadRequest(model="spread"), timeout=10)
            assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "router" in (refused.value.details() or "")
            nodes = [hosts["a"], hosts["b"], hosts["c"]]
            for name in hosts:
                replica = await load_on(r, name, "spread")
                await r.wait_log(sees_ready(name, replica.id), 10)
            # A burst: published load cannot keep up, the router's own count must.
            burst = await asyncio.gather(
                *(r.stub.Route(pb.RouteRequest(model="spread"), timeout=10) for _ in range(30))
            )
            counts = await in_flight(nodes, "spread")
            assert sum(counts) == 30 and max(counts) - min(counts) <= 2, counts
            for reply in burst:
                released = await hosts["a"].stub.Release(
                    pb.ReleaseRequest(lease_id=reply.lease_id), timeout=5
                )
                assert released.released
            assert await in_flight(nodes, "spread") == [0, 0, 0]
        finally:
            await r.stop()


async def test_cluster_token_guards_calls_between_hosts(tmp_path: Path, pg_dsn: str) -> None:
    token = "cluster-token-0123456789abcdef"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    extra = f'token_file = "{token_file}"\n'
    auth = (("authorization", f"Bearer {token}"),)
    async with running_cluster(tmp_path, pg_dsn, ["a", "b"], extra=extra) as hosts:
        a, b = hosts["a"], hosts["b"]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await a.stub.Route(pb.RouteRequest(model="echo"), timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        reply = await b.stub.Load(pb.LoadRequest(model="echo"), metadata=auth, timeout=30)
        await a.wait_log(sees_ready("b", reply.replicas[0].id), 10)
        lease = await a.stub.Route(pb.RouteRequest(model="echo"), metadata=auth, timeout=10)
        assert lease.lease_id.startswith("b~")
        released = await a.stub.Release(
            pb.ReleaseRequest(lease_id=lease.lease_id), metadata=auth, timeout=5
        )
        assert released.released
