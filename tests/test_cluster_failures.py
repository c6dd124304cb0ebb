"""Cluster behaviour with real PostgreSQL and real daemons: where Routes land,
and what kill -9, SIGSTOP, a database outage and a killed LISTEN connection do.

Host TTL is 2 s (cluster_proc.HOST_TTL), so each test takes a few seconds.
"""

import asyncio
import os
import signal
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest

from cluster_proc import (
    HOST_TTL,
    after,
    db_rows,
    event,
    load_on,
    running_cluster,
    sees_ready,
    start_host,
    until_db,
)
from daemon_proc import DaemonProc
from faultproxy import FaultProxy
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.cluster.marker import Marker

pytestmark = pytest.mark.timeout(150)


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
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        b.proc.kill()
        os.kill(replica.pid, signal.SIGKILL)
        await b.proc.wait()
        # Its leases died with it: released false, from any modeld, not an error.
        for daemon, lease in ((a, leases["c"]), (c, leases["b"])):
            lost = await daemon.stub.Release(pb.ReleaseRequest(lease_id=lease), timeout=10)
            assert not lost.released
        for daemon in (a, c):
            reply = await daemon.stub.Route(pb.RouteRequest(model="echo"), timeout=30)
            assert reply.replica_id != replica.id
            assert reply.lease_id.startswith(("a~", "c~"))
        # From host_ttl + 1 s after the kill on, no modeld even tries b.
        await asyncio.sleep(max(0.0, killed_at + HOST_TTL + 1 - loop.time()))
        tried = [after(d, event("cluster_forward_retry", replica_id=replica.id)) for d in (a, c)]
        for daemon in (a, c, a, c):
            reply = await daemon.stub.Route(pb.RouteRequest(model="echo"), timeout=10)
            assert reply.lease_id.startswith(("a~", "c~"))
            await daemon.stub.Release(pb.ReleaseRequest(lease_id=reply.lease_id), timeout=10)
        for daemon, match in zip((a, c), tried, strict=True):
            assert not [e for e in daemon.log if match(e)]
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
            assert "b" not in view["hosts"]
        # Reaped: a lease of b is still answered, released false.
        gone = await c.stub.Release(pb.ReleaseRequest(lease_id=leases["a"]), timeout=10)
        assert not gone.released


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
        fenced = after(b, event("cluster_fenced", epoch=registered["epoch"]))
        again = await b.wait_log(reregistered, 10)
        # Its first write after SIGCONT, under the old epoch, was refused.
        assert [e for e in b.log if fenced(e)]
        assert again["epoch"] > registered["epoch"]
        assert again["replicas"] == 1
        await a.wait_log(seen_again, 10)
        rows = await db_rows(pg_dsn, "SELECT replica_id, epoch FROM modeld_replicas")
        assert [(r["replica_id"], r["epoch"]) for r in rows] == [(replica.id, again["epoch"])]
        reply = await a.stub.Route(pb.RouteRequest(model="echo"), timeout=10)
        assert reply.replica_id == replica.id and reply.lease_id.startswith("b~")
        # One new epoch: a stale write's refusal, arriving late, did not fence it again.
        assert len([e for e in b.log if reregistered(e)]) == 1
        # Never twice: every view a logged showed b under one epoch and its replica once.
        for entry in a.log:
            if entry.get("event") == "cluster_view_changed":
                assert entry["ready"].count(f"b/{replica.id}") <= 1, entry
                assert entry["hosts"].get("b") in (None, registered["epoch"], again["epoch"])


# The outage of the issue: many host TTLs long, so every lease runs out in the database.
OUTAGE_S = 30.0


@pytest.mark.timeout(240)
@pytest.mark.long
async def test_database_outage_keeps_warm_routes(tmp_path: Path, pg_dsn: str) -> None:
    target = urlsplit(pg_dsn)
    proxy = await FaultProxy.start(target.hostname or "127.0.0.1", target.port or 5432)
    try:
        dsn = proxy.dsn(pg_dsn)
        async with running_cluster(tmp_path, dsn, ["a", "b"]) as hosts:
            a, b = hosts["a"], hosts["b"]
            replica = await load_on(b, "b")
            seen = await a.wait_log(sees_ready("b", replica.id), 10)
            epochs = seen["hosts"]
            down = [after(d, event("cluster_db_down")) for d in (a, b)]
            up = [after(d, event("cluster_db_up")) for d in (a, b)]
            mark = {name: len(d.log) for name, d in hosts.items()}
            proxy.cut()
            await asyncio.gather(a.wait_log(down[0], 10), b.wait_log(down[1], 10))
            await refused_fast(a, pb.LoadRequest(model="echo"), proxy.port)
            await refused_fast(b, pb.LoadRequest(model="echo"), proxy.port)
            ok, failed = await warm_routes(a, replica.id, OUTAGE_S)
            print(f"warm routes during a {OUTAGE_S:.0f} s outage: {ok} ok, {failed} failed")
            assert ok / (ok + failed) >= 0.99, (ok, failed)
            proxy.restore()
            await asyncio.gather(a.wait_log(up[0], 15), b.wait_log(up[1], 15))
            # b renews its own row, same epoch, within one heartbeat of its link coming back.
            await until_db(
                pg_dsn,
                "SELECT host_id, epoch FROM modeld_hosts WHERE lease_expires_at > now()",
                lambda rows: {r["host_id"]: r["epoch"] for r in rows} == epochs,
                HOST_TTL + 5,
            )
            # Past the reap delay (one host_ttl after the link is back): nobody reaped.
            with pytest.raises(TimeoutError):
                await a.wait_log(after(a, event("cluster_host_reaped")), 2 * HOST_TTL)
            for name, daemon in hosts.items():
                since = daemon.log[mark[name] :]
                for gone in ("cluster_host_reaped", "cluster_registered", "cluster_fenced"):
                    assert not [e for e in since if e.get("event") == gone], (name, gone)
                # b's replica never left a's view, not even for a moment.
                views = [e for e in since if e.get("event") == "cluster_view_changed"]
                assert all(f"b/{replica.id}" in e["ready"] for e in views), views
                assert all(e["hosts"] == epochs for e in views), views
            rows = await db_rows(pg_dsn, "SELECT host_id, epoch FROM modeld_hosts")
            assert {r["host_id"]: r["epoch"] for r in rows} == epochs
            # a's trust window is over: routing to b now means its view renewed b's lease.
            reply = await a.stub.Route(pb.RouteRequest(model="echo"), timeout=5)
            assert reply.replica_id == replica.id and reply.lease_id.startswith("b~")
    finally:
        await proxy.close()


async def refused_fast(daemon: DaemonProc, request: pb.LoadRequest, port: int) -> None:
    """A Load needs the database: refused at once, with UNAVAILABLE naming it."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await daemon.stub.Load(request, timeout=10)
    assert loop.time() - began < 2.0
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    details = refused.value.details() or ""
    assert "cluster database" in details and f"127.0.0.1:{port}" in details, details


async def warm_routes(via: DaemonProc, replica_id: str, seconds: float) -> tuple[int, int]:
    """Route+Release pairs through `via` for `seconds`: (succeeded, failed)."""
    ok = failed = 0
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while loop.time() < until:
        try:
            reply = await via.stub.Route(pb.RouteRequest(model="echo"), timeout=5)
            assert reply.replica_id == replica_id
            await via.stub.Release(pb.ReleaseRequest(lease_id=reply.lease_id), timeout=5)
            ok += 1
        except grpc.aio.AioRpcError:
            failed += 1
    return ok, failed


async def test_killed_listen_connection_reconnects_and_misses_nothing(
    tmp_path: Path, pg_dsn: str
) -> None:
    # A long TTL: the periodic resync (every host_ttl / 3 = 20 s) cannot be what
    # brings the change; only the resync on reconnecting, or a notification, can.
    ttl = 60.0
    async with running_cluster(tmp_path, pg_dsn, ["a", "b"], ttl=ttl) as hosts:
        a, b = hosts["a"], hosts["b"]
        lost = after(a, event("cluster_db_down"))
        listening = after(a, event("cluster_db_up"))
        # a is stopped while its one connection (its LISTEN) is killed and b changes:
        # the notification is sent while a has no connection at all.
        a.proc.send_signal(signal.SIGSTOP)
        try:
            # pg_stat_activity spans every database: other runs have hosts named a too.
            mine = "datname = current_database() AND application_name LIKE 'modeld%/a'"
            killed = await db_rows(
                pg_dsn, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {mine}"
            )
            assert [r[0] for r in killed] == [True]
            await until_db(
                pg_dsn, f"SELECT pid FROM pg_stat_activity WHERE {mine}", lambda r: r == [], 10
            )
            replica = await load_on(b, "b")
            seen = after(a, sees_ready("b", replica.id))
        finally:
            a.proc.send_signal(signal.SIGCONT)
        loop = asyncio.get_running_loop()
        resumed = loop.time()
        await a.wait_log(lost, 10)
        await a.wait_log(listening, 10)
        view = await a.wait_log(seen, 10)
        assert a.log.index(view) > a.log.index(next(e for e in a.log if listening(e)))
        assert loop.time() - resumed < ttl / 3
        reply = await a.stub.Route(pb.RouteRequest(model="echo"), timeout=10)
        assert reply.replica_id == replica.id
        await a.stub.Release(pb.ReleaseRequest(lease_id=reply.lease_id), timeout=10)
        # Listening again: b's next change arrives by notification, long before a resync.
        unloaded = after(a, lambda e: e.get("event") == "cluster_view_changed" and not e["ready"])
        changed_at = loop.time()
        await b.stub.Unload(pb.UnloadRequest(model="echo"), timeout=30)
        await a.wait_log(unloaded, 10)
        assert loop.time() - changed_at < ttl / 3


async def test_owner_checks_replica_identity_before_leasing(tmp_path: Path, pg_dsn: str) -> None:
    a = await start_host(tmp_path, pg_dsn, "a")
    try:
        replica = await load_on(a, "a")
        md = (("modeld-forwarded", Marker(replica.id, replica.restarts).encode()),)
        reply = await a.stub.Route(pb.RouteRequest(model="echo"), metadata=md, timeout=10)
        assert reply.lease_id.startswith("a~") and reply.replica_id == replica.id
        for marker in (
            Marker(replica.id, replica.restarts + 1).encode(),
            Marker("feedfacecafe", 0).encode(),
            f"{replica.id}:{replica.restarts}",  # an older modeld's format names nothing
        ):
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
        reply = await node.stub.ListReplicas(
            pb.ListReplicasRequest(model=model, local=True), timeout=5
        )
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
