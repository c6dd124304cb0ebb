"""Operating a cluster: ListHosts / `modeld hosts`, cluster-wide ListReplicas / `modeld ps`,
cluster events in WatchEvents, and the cluster metrics.

Pure parts (host states, the view diff, converters, the metrics collector) on fixed
data; the rest with real daemons and real PostgreSQL (cluster_proc.HOST_TTL = 2 s).
"""

import asyncio
import json
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backend_proc import free_port
from cli_proc import modeld
from cluster_proc import HOST_TTL, cluster_toml
from daemon_proc import ECHO_CATALOG, DaemonProc, running_daemon, start_daemon, write_config
from faultproxy import FaultProxy
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.api import convert
from modeld.clock import FakeClock
from modeld.cluster.listing import (
    Here,
    host_replica_counts,
    host_state,
    host_state_counts,
    list_hosts,
    view_events,
)
from modeld.cluster.membership import Membership
from modeld.cluster.store import Changes, Snapshot
from modeld.cluster.view import ClusterView, HostFigures, RemoteHost
from modeld.config import ClusterConfig
from modeld.info import HostEntry, HostState, RemoteReplica
from modeld.ops.events import CLUSTER, Event, EventBus
from modeld.ops.metrics import ClusterStats, Metrics
from modeld.state import ReplicaState

pytestmark = pytest.mark.timeout(120)
S = ReplicaState


def _host(host_id: str, expires: float, epoch: int = 1, **labels: str) -> RemoteHost:
    return RemoteHost(host_id, epoch, f"{host_id}:1", "node", labels, expires)


def _replica(rid: str, host: str, state: S = S.READY, generation: int = 0) -> RemoteReplica:
    return RemoteReplica(rid, host, 1, "m", state, f"{rid}:2", generation, 0, 1.0e9, 0)


# host states and ListHosts' rows


@pytest.mark.parametrize(
    ("remaining", "trust_expired", "expected"),
    [
        (9.0, False, HostState.ALIVE),
        (2.6, False, HostState.ALIVE),  # a quarter of 10 s is the line
        (2.4, False, HostState.SUSPECT),
        (0.0, False, HostState.EXPIRED),
        (-5.0, False, HostState.EXPIRED),
        (-5.0, True, HostState.SUSPECT),  # our own link is down: expiry is not judged
        (None, False, HostState.SUSPECT),  # this host, not registered yet
    ],
)
def test_host_state(remaining: float | None, trust_expired: bool, expected: HostState) -> None:
    assert host_state(remaining, 10.0, trust_expired) is expected


def test_list_hosts_from_the_view_and_this_host_from_its_router() -> None:
    view = ClusterView("me")
    view.replace_all(
        [
            _host("me", 110.0),
            replace(
                _host("b", 102.0, gpu="h100"),
                figures=HostFigures(gpu_free=(1, 2), gpu_total=(3, 4)),
            ),
            _host("c", 95.0),
        ],
        [_replica("r1", "b"), _replica("r2", "b", S.LOADING), _replica("r3", "me")],
    )
    here = Here("me", "me:1", "node", {}, replicas=3)
    rows = list_hosts(view, 100.0, 10.0, trust_expired=False, here=here)
    assert [(h.host_id, h.state, h.replicas, h.local) for h in rows] == [
        ("b", HostState.SUSPECT, 2, False),
        ("c", HostState.EXPIRED, 0, False),
        ("me", HostState.ALIVE, 3, True),
    ]
    assert rows[0].labels == {"gpu": "h100"}
    assert rows[0].lease_remaining == pytest.approx(2.0)
    assert rows[0].heartbeat_age == pytest.approx(8.0)
    assert (rows[0].gpu_free, rows[0].gpu_total) == ((1, 2), (3, 4))
    assert rows[1].gpu_free == rows[1].gpu_total == ()  # not published yet
    # Not in the view yet (database unreachable since start): described by itself.
    alone = list_hosts(ClusterView("me"), 100.0, 10.0, trust_expired=True, here=here)
    assert [(h.host_id, h.state, h.heartbeat_age, h.address) for h in alone] == [
        ("me", HostState.SUSPECT, None, "me:1")
    ]
    assert host_state_counts(rows) == {"alive": 1, "suspect": 1, "expired": 1}
    assert host_replica_counts(view) == {
        "me": {"READY": 1},
        "b": {"READY": 1, "LOADING": 1},
        "c": {},
    }


def test_view_events_report_other_hosts_changes_only() -> None:
    before = {r.id: r for r in [
        _replica("x", "b", S.LOADING), _replica("gone", "b"), _replica("left", "c"),
        _replica("mine", "me", S.LOADING), _replica("same", "b"), _replica("again", "b"),
    ]}  # fmt: skip
    after = {r.id: r for r in [
        _replica("x", "b"), _replica("new", "b"), _replica("mine", "me"), _replica("same", "b"),
        _replica("again", "b", generation=1),
    ]}  # fmt: skip
    events = view_events(before, after, {"b": _host("b", 1.0)}, "me", 5.0)
    got = [(e.replica_id, e.from_state, e.to_state, e.reason) for e in events]
    assert got == [
        ("again", S.READY, S.READY, "restarted"),
        ("gone", S.READY, S.STOPPED, "gone from host b"),
        ("left", S.READY, S.STOPPED, "host c left the cluster"),
        ("new", None, S.READY, "seen on host b"),
        ("x", S.LOADING, S.READY, ""),
    ]
    assert {(e.kind, e.time) for e in events} == {(CLUSTER, 5.0)}
    assert [e.host_id for e in events] == ["b", "b", "c", "b", "b"]


async def test_membership_records_resyncs_and_publishes_view_changes() -> None:
    clock, bus = FakeClock(), EventBus()
    cfg = ClusterConfig("postgresql://x/y", "", "me", "me:1", "127.0.0.1", host_ttl=3.0)
    membership = Membership(cfg, cfg.dsn, clock, bus, list)
    watcher = bus.subscribe()
    clock.advance(5.0)
    assert membership.view_age() == 5.0  # never read: as old as the daemon
    hosts = [{"host_id": h, "epoch": 1, "address": f"{h}:1", "role": "node", "labels": "{}",
              "remaining": 3.0} for h in ("me", "b")]  # fmt: skip
    row = {"id": "r1", "host_id": "b", "epoch": 1, "model": "m", "state": "LOADING",
           "address": "b:2", "generation": 0, "in_flight": 0, "last_used": 0.0,
           "free_memory": 0}  # fmt: skip
    mine = {**row, "id": "r0", "host_id": "me"}

    class Store:
        snapshot = Snapshot(hosts, [row, mine])

        async def read(self, _hosts: object) -> Snapshot:
            return self.snapshot

        async def read_since(self, _version: int, _near: float) -> Changes:
            # Both hosts changed; the count and the epoch sum match the view's.
            return Changes(self.snapshot, ["me", "b"], 2, 2, {})

    store: Any = Store()
    await membership._resync(store)  # the first: a full read
    assert membership.view_age() == 0.0
    clock.advance(1.5)
    assert membership.view_age() == 1.5
    store.snapshot = Snapshot(hosts, [{**row, "state": "READY"}, mine])
    await membership._resync(store)  # incremental from now on
    assert membership.view_age() == 0.0
    got = [(e.kind, e.host_id, e.replica_id, e.from_state, e.to_state) for e in watcher.pending()]
    # This host's own replica (r0) is reported by its supervisor, never from the view.
    assert got == [
        (CLUSTER, "b", "r1", None, S.LOADING),
        (CLUSTER, "b", "r1", S.LOADING, S.READY),
    ]


# converters


def test_host_and_remote_replica_and_event_converters() -> None:
    entry = HostEntry("b", 7, "b:1", "router", {"gpu": "h100"}, HostState.SUSPECT, 2,
                      (1, 2), (3, 4), 5, 6, -0.5, 10.5, False)  # fmt: skip
    msg = convert.host_to_proto(entry)
    assert (msg.host_id, msg.state, msg.role, msg.epoch, dict(msg.labels)) == (
        "b", pb.HOST_SUSPECT, "router", 7, {"gpu": "h100"}
    )  # fmt: skip
    assert (list(msg.gpu_free), list(msg.gpu_total), msg.replicas) == ([1, 2], [3, 4], 2)
    assert (msg.ram_free, msg.ram_total) == (5, 6)
    assert msg.heartbeat_age.ToNanoseconds() == 10_500_000_000
    assert msg.lease_remaining.ToNanoseconds() == -500_000_000
    unknown = convert.host_to_proto(
        HostEntry("me", 0, "", "node", {}, HostState.SUSPECT, 0, (), (), 0, 0, None, None, True)
    )
    assert not unknown.HasField("heartbeat_age") and unknown.local

    replica = convert.replica_to_proto(_replica("r", "b", S.LOADING, generation=3).listed())
    assert (replica.id, replica.host_id, replica.state, replica.restarts, replica.pid) == (
        "r", "b", pb.LOADING, 3, 0
    )  # fmt: skip
    assert replica.last_used.seconds == 1_000_000_000

    local = Event(1.0, "r", "m", S.STARTING, S.READY)
    assert convert.event_to_proto(local).host_id == ""
    assert convert.event_to_proto(local, "a").host_id == "a"
    remote = Event(1.0, "r", "m", None, S.READY, kind=CLUSTER, host_id="b")
    assert convert.event_to_proto(remote, "a").host_id == "b"


# metrics


def test_cluster_metrics_are_read_at_scrape_time() -> None:
    metrics = Metrics(process=False)
    assert b"modeld_cluster" not in metrics.exposition()
    stats = ClusterStats(
        counters={"forwards": 5, "claims_lost": 1, "claims_renewed": 3},
        view_age=0.75,
        host_replicas={"a": {"READY": 2}, "b": {}},
        hosts={"alive": 2, "suspect": 0, "expired": 0},
        db_connections=1,
    )
    metrics.set_cluster_source(lambda: stats)
    samples = _samples(metrics.exposition().decode())
    assert samples[("modeld_cluster_forwards_total", ())] == 5
    assert samples[("modeld_cluster_claims_lost_total", ())] == 1
    assert samples[("modeld_cluster_placement_refusals_total", ())] == 0
    assert samples[("modeld_cluster_claims_renewed_total", ())] == 3  # not in the table
    assert samples[("modeld_cluster_view_staleness_seconds", ())] == 0.75
    assert samples[("modeld_cluster_host_replicas", (("host", "a"), ("state", "READY")))] == 2
    assert samples[("modeld_cluster_host_replicas", (("host", "b"), ("state", "READY")))] == 0
    assert samples[("modeld_cluster_hosts", (("state", "alive"),))] == 2
    assert samples[("modeld_cluster_db_connections", ())] == 1
    assert samples[("modeld_cluster_db_transactions_total", ())] == 0


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def _scrape(port: int) -> Samples:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text: str = reply.read().decode()
            return text

    return _samples(await asyncio.to_thread(get))


# real daemons


async def _start(tmp_path: Path, dsn: str, host_id: str, extra: str = "") -> tuple[DaemonProc, int]:
    """A cluster host serving metrics; returns it and its metrics port."""
    folder = tmp_path / host_id
    folder.mkdir()
    port = free_port()
    body = f'metrics_listen = "127.0.0.1:{port}"\n' + cluster_toml(dsn, host_id, HOST_TTL, extra)
    # max_replicas counts the whole cluster: one replica on a and one on b need two.
    body += '[models.pair]\nbackend = "echo"\nmax_replicas = 2\n'
    config, addr = write_config(folder, body)
    daemon = await start_daemon(config, addr)
    try:
        await daemon.wait_log(lambda e: e.get("event") == "cluster_registered", 20.0)
    except BaseException:
        await daemon.close()
        raise
    return daemon, port


async def _stop(*daemons: DaemonProc) -> None:
    for daemon in daemons:
        if daemon.proc.returncode is None:
            await daemon.stop()
        await daemon.close()


async def _watch(daemon: DaemonProc, cluster: bool) -> Any:
    """A WatchEvents stream, subscribed once this returns (a Ping follows it in order)."""
    call = daemon.stub.WatchEvents(pb.WatchEventsRequest(cluster=cluster))
    await daemon.stub.Ping(pb.PingRequest(), timeout=10)
    return call


async def _next_event(call: Any, match: Any, limit_s: float = 20.0) -> pb.Event:
    async def find() -> pb.Event:
        while True:
            event: pb.Event = await call.read()
            assert event is not grpc.aio.EOF
            if match(event):
                return event

    return await asyncio.wait_for(find(), limit_s)


async def test_hosts_ps_events_and_metrics_across_three_hosts(tmp_path: Path, pg_dsn: str) -> None:
    # One at a time: three Python daemons starting at once on a loaded 2-core machine
    # can overrun the start deadline.
    daemons: list[DaemonProc] = []
    try:
        a, a_metrics = await _start(tmp_path, pg_dsn, "a", 'labels = { gpu = "h100" }\n')
        daemons.append(a)
        b, _ = await _start(tmp_path, pg_dsn, "b")
        daemons.append(b)
        c, _ = await _start(tmp_path, pg_dsn, "c", 'role = "router"\n')
        daemons.append(c)
        await _hosts_are_listed(a, b, c)
        await _replicas_events_and_metrics(a, b, a_metrics)
        await _a_router_lists_the_whole_cluster(c)
    finally:
        await _stop(*daemons)


def _sees(*host_ids: str) -> Any:
    return lambda e: e.get("event") == "cluster_view_changed" and set(host_ids) <= set(e["hosts"])


async def _hosts_are_listed(a: DaemonProc, b: DaemonProc, c: DaemonProc) -> None:
    # a sees b and c once their registrations' notifications (or a resync) arrived.
    await a.wait_log(_sees("a", "b", "c"), 20)
    hosts = {
        h.host_id: h for h in (await a.stub.ListHosts(pb.ListHostsRequest(), timeout=10)).hosts
    }
    assert sorted(hosts) == ["a", "b", "c"]
    assert [h.local for h in hosts.values()] == [True, False, False]
    assert [h.address for h in hosts.values()] == [a.addr, b.addr, c.addr]
    assert [h.role for h in hosts.values()] == ["node", "node", "router"]
    assert dict(hosts["a"].labels) == {"gpu": "h100"} and not hosts["b"].labels
    for h in hosts.values():
        assert h.state in (pb.HOST_ALIVE, pb.HOST_SUSPECT)  # suspect only on a late renewal
        assert 0 <= h.heartbeat_age.ToNanoseconds() / 1e9 <= HOST_TTL
        assert h.epoch > 0 and h.replicas == 0
        # Memory is published with the registration (GPUs where there are, RAM always).
        assert h.ram_total > 0 and h.ram_free > 0
    shown = await modeld("hosts", "--addr", a.addr)
    assert shown.code == 0, shown.err
    lines = shown.out.splitlines()
    assert lines[0].split()[:4] == ["HOST", "ADDRESS", "ROLE", "STATE"]
    assert lines[1].split()[:3] == ["a", "(here)", a.addr] and "gpu=h100" in lines[1]
    assert lines[2].split()[:3] == ["b", b.addr, "node"]
    assert lines[3].split()[:3] == ["c", c.addr, "router"]


async def _replicas_events_and_metrics(a: DaemonProc, b: DaemonProc, a_metrics: int) -> None:
    # A replica starting on b shows on a's cluster watch, never on a plain one.
    everything, plain = await _watch(a, cluster=True), await _watch(a, cluster=False)
    on_b = (await b.stub.Load(pb.LoadRequest(model="pair"), timeout=30)).replicas[0]
    seen = await _next_event(
        everything, lambda e: e.replica_id == on_b.id and e.to_state == pb.READY
    )
    assert (seen.host_id, seen.model) == ("b", "pair")
    on_a = (await a.stub.Load(pb.LoadRequest(model="pair"), timeout=30)).replicas[0]
    first = await _next_event(plain, lambda e: True)
    assert (first.replica_id, first.host_id) == (on_a.id, "a")

    listed = (await a.stub.ListReplicas(pb.ListReplicasRequest(), timeout=10)).replicas
    assert sorted((r.host_id, r.id) for r in listed) == [("a", on_a.id), ("b", on_b.id)]
    mine = (await a.stub.ListReplicas(pb.ListReplicasRequest(local=True), timeout=10)).replicas
    assert [(r.host_id, r.id) for r in mine] == [("a", on_a.id)]
    ps = await modeld("ps", "--addr", a.addr)
    assert ps.code == 0, ps.err
    rows = [line.split() for line in ps.out.splitlines()]
    assert rows[0][:2] == ["HOST", "MODEL"]
    assert sorted((r[0], r[2], r[3]) for r in rows[1:]) == [
        ("a", on_a.id, "READY"),
        ("b", on_b.id, "READY"),
    ]
    local = await modeld("ps", "--local", "--addr", a.addr)
    assert [line.split()[0] for line in local.out.splitlines()[1:]] == ["a"]

    samples = await _scrape(a_metrics)
    assert samples[("modeld_cluster_host_replicas", (("host", "b"), ("state", "READY")))] == 1
    assert samples[("modeld_cluster_hosts", (("state", "expired"),))] == 0
    assert samples[("modeld_cluster_forwards_total", ())] >= 0
    # The link counts what it runs: one connection, and at least a statement a round.
    assert samples[("modeld_cluster_db_connections", ())] == 1
    assert samples[("modeld_cluster_db_connects_total", ())] == 1
    assert samples[("modeld_cluster_db_transactions_total", ())] > 0
    assert samples[("modeld_cluster_db_notifications_total", ())] > 0
    # A resync every host_ttl/3; a loaded machine may be late.
    assert 0 <= samples[("modeld_cluster_view_staleness_seconds", ())] < 3 * HOST_TTL
    hosts_now = (await a.stub.ListHosts(pb.ListHostsRequest(), timeout=10)).hosts
    assert {h.host_id: h.replicas for h in hosts_now} == {"a": 1, "b": 1, "c": 0}

    # Stopping it on b: a's cluster watch hears it went away.
    await b.stub.Unload(pb.UnloadRequest(model="pair"), timeout=30)
    gone = await _next_event(
        everything, lambda e: e.replica_id == on_b.id and e.to_state == pb.STOPPED
    )
    assert (gone.host_id, gone.reason) == ("b", "gone from host b")
    everything.cancel()
    plain.cancel()


async def _a_router_lists_the_whole_cluster(c: DaemonProc) -> None:
    """c runs no backends: its ps is the view, a's replica only (b's was unloaded)."""
    await c.wait_log(
        lambda e: (
            e.get("event") == "cluster_view_changed"
            and [r.partition("/")[0] for r in e["ready"]] == ["a"]
        ),
        20,
    )
    ps = await modeld("ps", "--json", "--addr", c.addr)
    assert ps.code == 0, ps.err
    assert [r["host_id"] for r in json.loads(ps.out)["replicas"]] == ["a"]
    local = await modeld("ps", "--local", "--addr", c.addr)
    assert local.out.splitlines() == [local.out.splitlines()[0]]  # the header only


async def test_view_staleness_grows_while_the_database_is_cut(tmp_path: Path, pg_dsn: str) -> None:
    target = urlsplit(pg_dsn)
    proxy = await FaultProxy.start(target.hostname or "127.0.0.1", target.port or 5432)
    try:
        a, port = await _start(tmp_path, proxy.dsn(pg_dsn), "a")
        try:
            cut_at = time.monotonic()
            proxy.cut()
            await a.wait_log(lambda e: e.get("event") == "cluster_db_down", 20)
            elapsed = time.monotonic() - cut_at
            first = (await _scrape(port))[("modeld_cluster_view_staleness_seconds", ())]
            # The last resync read before the cut (one answered just then may finish a
            # moment later): the view is about as old as the cut, or older.
            assert first >= elapsed - 0.5
            second = (await _scrape(port))[("modeld_cluster_view_staleness_seconds", ())]
            assert second > first  # no resync succeeds while the database is cut
            hosts = (await a.stub.ListHosts(pb.ListHostsRequest(), timeout=10)).hosts
            # Our own link is down: expiry cannot be judged, so nobody is shown expired.
            assert [h.state for h in hosts] in ([pb.HOST_ALIVE], [pb.HOST_SUSPECT])
        finally:
            proxy.restore()
            await _stop(a)
    finally:
        await proxy.close()


async def test_single_host_lists_no_hosts_and_ps_is_unchanged(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ECHO_CATALOG) as d:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await d.stub.ListHosts(pb.ListHostsRequest(), timeout=10)
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "[cluster] is not set" in (caught.value.details() or "")
        shown = await modeld("hosts", "--addr", d.addr)
        assert shown.code == 1 and shown.err.startswith("modeld: FAILED_PRECONDITION:")
        loaded = (await d.stub.Load(pb.LoadRequest(model="echo"), timeout=30)).replicas[0]
        assert loaded.host_id == ""
        for args in (("ps",), ("ps", "--local")):
            ps = await modeld(*args, "--addr", d.addr)
            assert ps.out.splitlines()[0].split()[:2] == ["MODEL", "REPLICA"], args
        await d.stub.Unload(pb.UnloadRequest(model="echo"), timeout=30)
