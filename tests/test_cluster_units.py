"""Cluster pieces without daemons: [cluster] config, the view and pick, the schema."""

import asyncio
import json
import socket
from dataclasses import replace
from pathlib import Path

import asyncpg
import grpc
import pytest

from modeld import config
from modeld.cluster.forward import Load, Peers
from modeld.cluster.marker import PLAIN, Marker, parse
from modeld.cluster.ownload import OwnLoad
from modeld.cluster.schema import SCHEMA_VERSION, migrate
from modeld.cluster.view import ClusterView, RemoteHost
from modeld.errors import RETRY_KEY, ConfigError, PeerUnreachable, RegistryError, Unavailable
from modeld.info import RemoteReplica
from modeld.policy.cluster_route import estimate, pick_remote, route_target
from modeld.state import ReplicaState


def test_no_cluster_table_is_the_single_host_daemon() -> None:
    assert config.load(None, env={}).cluster is None


def test_cluster_keys_defaults_and_secret_dsn(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text(
        'listen = ["10.1.2.3:7000"]\n[cluster]\n'
        'dsn = "postgresql://modeld:s3cret@db:5432/modeld"\nlabels = {rack = "r1"}\n'
    )
    cfg = config.load(str(path), env={})
    assert cfg.cluster is not None
    assert cfg.cluster.advertise == "10.1.2.3:7000"
    assert cfg.cluster.backend_host == "10.1.2.3"
    assert cfg.cluster.host_ttl == 10.0
    assert cfg.cluster.role == "node"
    assert dict(cfg.cluster.labels) == {"rack": "r1"}
    shown = cfg.show()
    assert "s3cret" not in shown and "s3cret" not in repr(cfg)
    assert json.loads(shown)["cluster"]["dsn"] == "postgresql://modeld:***@db:5432/modeld"
    assert config.redact_dsn("host=db password=abc user=x") == "host=db password=*** user=x"


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"MODELD_CLUSTER_ROLE": "boss"}, "cluster.role"),
        ({"MODELD_CLUSTER_HOST_ID": "a~b"}, "cluster.host_id"),
        ({"MODELD_CLUSTER_HOST_TTL": "100ms"}, "cluster.host_ttl"),
        ({"MODELD_CLUSTER_HOST_ID": "a"}, "exactly one of cluster.dsn"),
        ({"MODELD_CLUSTER_ADVERTISE": "0.0.0.0:1"}, "cluster.advertise"),
    ],
)
def test_bad_cluster_keys_name_the_key(env: dict[str, str], match: str) -> None:
    base = {"MODELD_CLUSTER_DSN": "postgresql://db/x"}
    if "exactly" in match:
        base = {}
    with pytest.raises(ConfigError, match=match):
        config.load(None, env={**base, **env})


def _host(host_id: str, epoch: int, expires: float) -> RemoteHost:
    return RemoteHost(host_id, epoch, f"{host_id}:1", "node", {}, expires)


def _replica(rid: str, host: str, epoch: int, **kw: object) -> RemoteReplica:
    values: dict[str, object] = {
        "model": "m",
        "state": ReplicaState.READY,
        "address": "x:1",
        "generation": 0,
        "in_flight": 0,
        "last_used": 100.0,
        "free_memory": 0,
    }
    values.update(kw)
    return RemoteReplica(rid, host, epoch, **values)  # type: ignore[arg-type]


def test_view_ignores_older_epochs_self_and_expired_hosts() -> None:
    view = ClusterView("me")
    view.replace_all(
        [_host("a", 5, 10.0), _host("b", 2, 1.0), _host("me", 1, 10.0)],
        [
            _replica("r1", "a", 5),
            _replica("stale", "a", 4),
            _replica("r2", "b", 2),
            _replica("mine", "me", 1),
            _replica("loading", "a", 5, state=ReplicaState.LOADING),
        ],
    )
    assert "stale" not in view.replicas
    assert [r.id for r in view.candidates("m", 5.0, trust_expired=False)] == ["r1"]
    # While our own link is down (or just back), expiry is not judged.
    assert {r.id for r in view.candidates("m", 5.0, trust_expired=True)} == {"r1", "r2"}
    view.replace_host("a", None, [])
    assert view.candidates("m", 0.0, trust_expired=True) == [view.replicas["r2"]]


def test_pick_remote_is_the_picker_policy_with_pending_forwards() -> None:
    busy = _replica("a", "h1", 1, in_flight=2)
    old = _replica("b", "h2", 1, in_flight=1, last_used=50.0)
    new = _replica("c", "h3", 1, in_flight=1, last_used=60.0, free_memory=10)
    assert pick_remote([busy, old, new], {}) is old
    assert pick_remote([busy, old, new], {"b": 1}) is new
    roomy = _replica("d", "h4", 1, in_flight=1, last_used=50.0, free_memory=99)
    assert pick_remote([old, roomy], {}) is roomy
    assert pick_remote([], {}) is None


async def test_schema_migrates_once_and_refuses_a_newer_one(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await migrate(conn) == SCHEMA_VERSION
        assert await migrate(conn) == SCHEMA_VERSION
        assert await conn.fetchval("SELECT count(*) FROM modeld_schema") == SCHEMA_VERSION
        await conn.execute("INSERT INTO modeld_schema (version) VALUES (99)")
        with pytest.raises(RegistryError, match="newer than this modeld"):
            await migrate(conn)
    finally:
        await conn.close()


def test_own_load_counts_forwards_owner_figures_and_releases_until_a_new_row() -> None:
    own = OwnLoad()
    row = _replica("x", "h", 1, in_flight=3)
    # Three forwards at once; the owner grants them in order (4, 5, 6 in flight)
    # but the answers come back 6, 4, 5: the estimate is right after each one.
    for _ in range(3):
        own.begin(row)
    assert own.extra([row]) == {"x": 3}
    for figure in (6, 4, 5):
        own.end(row)
        own.granted(row, f"h~{figure}")
        own.observed(row, figure)
        assert own.extra([row]) == {"x": 3}
    # Others' leases there (the owner's own clients) raise the estimate...
    own.begin(row)
    own.end(row)
    own.observed(row, 9)  # a declined forward: no lease, the owner's figure
    assert own.extra([row]) == {"x": 6}
    # ...and a release through this host lowers it.
    own.released("h~4", row)
    assert own.extra([row]) == {"x": 5}
    # The owner published: its figure now includes our leases, ours starts again from 0.
    newer = _replica("x", "h", 1, in_flight=8)
    assert own.extra([newer]) == {"x": 0}
    own.released("h~5", newer)
    assert own.extra([newer]) == {"x": -1}
    own.released("h~5", newer)
    assert own.extra([newer]) == {"x": -1}
    # Estimates never go below 0 (a release counted against a row that had it already).
    assert estimate(_replica("x", "h", 1, in_flight=0), {"x": -1}) == 0


def test_own_load_keeps_leases_a_row_published_mid_burst_cannot_count() -> None:
    # A router's burst over three idle replicas: each Route picks by estimate, is
    # forwarded, and is answered with the owner's figure. After a's fourth lease its
    # owner publishes a row written when it had 2: two of ours are not in it.
    own = OwnLoad()
    rows = {rid: _replica(rid, f"h{rid}", 1) for rid in "abc"}
    held = dict.fromkeys("abc", 0)
    for n in range(30):
        chosen = pick_remote(rows.values(), own.extra(rows.values()))
        assert chosen is not None
        own.begin(chosen)
        own.end(chosen)
        held[chosen.id] += 1
        own.granted(chosen, f"{chosen.id}~{n}")
        own.observed(chosen, held[chosen.id])
        if chosen.id == "a" and held["a"] == 4:
            rows["a"] = replace(rows["a"], in_flight=2, last_used=101.0)
        # A re-read of an unchanged row (another host's change was notified) is no news.
        rows["b"] = replace(rows["b"])
        extra = own.extra(rows.values())
        assert {rid: estimate(r, extra) for rid, r in rows.items()} == held
    assert sorted(held.values()) == [10, 10, 10]
    # A row that counts every lease: nothing of ours is carried past it.
    rows["a"] = replace(rows["a"], in_flight=10, last_used=102.0)
    assert own.extra([rows["a"]]) == {"a": 0}


def test_route_target_keeps_the_local_replica_unless_a_remote_has_fewer() -> None:
    b = _replica("b", "hb", 1, in_flight=3)
    c = _replica("c", "hc", 1, in_flight=2, last_used=50.0)
    # No local READY replica: the best remote, or None (start one here).
    assert route_target(None, [b, c], {}) is c
    assert route_target(None, [], {}) is None
    # A tie stays here (no hop); more than the best remote's estimate spills to it.
    assert route_target(2, [b, c], {}) is None
    assert route_target(3, [b, c], {}) is c
    # The estimate counts this host's own forwards and leases: c is now 4, b is best.
    assert route_target(3, [b, c], {"c": 2}) is None
    assert route_target(4, [b, c], {"c": 2}) is b
    # A margin tolerates that much more here before a hop.
    assert route_target(3, [b, c], {}, margin=1) is None
    assert route_target(4, [b, c], {}, margin=1) is c
    assert route_target(0, [], {}) is None


def test_every_forwarded_marker_has_one_format() -> None:
    for marker in (
        Marker("r1", 3),
        Marker("r1", 3, 0),
        Marker("r1", 0, 7),
        Marker(slot=2, claim=12345),
        Marker(),
    ):
        assert parse(marker.encode()) == marker
    assert PLAIN == "v=1" and Marker("r1", 3, 0).encode() == "v=1;replica=r1;gen=3;below=0"
    # Malformed, or an older modeld's format: names no replica, so the owner answers
    # NOT_FOUND, and no claim.
    for text in ("1", "r1:3", "claim:2:12345", "v=1;replica=r1;gen=x", "v=2;replica=r1;gen=3"):
        assert parse(text) == Marker()
    # A field a later version adds is passed over.
    assert parse("v=1;replica=r1;gen=3;zone=eu") == Marker("r1", 3)


def test_view_reports_hosts_that_left_or_moved() -> None:
    left: list[str] = []
    view = ClusterView("me", on_leave=lambda h: left.append(f"{h.host_id}@{h.address}"))
    view.replace_all([_host("a", 1, 10.0), _host("b", 1, 10.0), _host("c", 1, 10.0)], [])
    assert left == []
    # A new epoch at the same address is the same peer; a new address is not.
    view.replace_host("a", _host("a", 2, 10.0), [])
    view.replace_host("b", RemoteHost("b", 2, "b:2", "node", {}, 10.0), [])
    assert left == ["b@b:1"]
    view.replace_host("c", None, [])
    view.replace_all([_host("a", 2, 10.0)], [])
    assert left == ["b@b:1", "c@c:1", "b@b:2"]


async def test_peers_forget_closes_the_channel_of_a_departed_host() -> None:
    # A peer that accepts connections and never answers: a call to it would hang.
    silent = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
    address = f"127.0.0.1:{silent.sockets[0].getsockname()[1]}"
    peers = Peers(config.load(None, env={"MODELD_CLUSTER_DSN": "postgresql://db/x"}))
    try:
        call = asyncio.ensure_future(peers.release("a", address, "a~1", "OK", limit_s=60))
        # One turn of the loop puts the call on a new channel.
        await asyncio.sleep(0)
        channel = peers._peers[address].channel
        peers.forget(address)
        peers.forget(address)
        assert peers.addresses() == set()
        # The call still on it ends at once (not at its 60 s limit), as a domain error.
        with pytest.raises(Unavailable, match=r"host a: .* left the cluster"):
            await asyncio.wait_for(call, 20)
        await peers.close()
        assert channel.get_state() is grpc.ChannelConnectivity.SHUTDOWN
    finally:
        await peers.close()
        silent.close()


async def test_a_peer_that_answered_is_told_from_one_never_reached() -> None:
    """Typed, not read from the message: a modeld's refusal carries RETRY_KEY."""

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            "model 'm': failed to connect to all addresses of its backend",
            ((RETRY_KEY, "no"),),
        )

    handler = grpc.method_handlers_generic_handler(
        "modeld.v1.ModelControl", {"Load": grpc.unary_unary_rpc_method_handler(refuse)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    nobody = f"127.0.0.1:{closed.getsockname()[1]}"
    peers = Peers(config.load(None, env={"MODELD_CLUSTER_DSN": "postgresql://db/x"}))
    try:
        with pytest.raises(Unavailable) as answered:
            await peers.load(Load("m", 1, "a", f"127.0.0.1:{port}"), limit_s=20)
        assert not isinstance(answered.value, PeerUnreachable), answered.value
        with pytest.raises(PeerUnreachable, match="host b: "):
            await peers.load(Load("m", 1, "b", nobody), limit_s=20)
    finally:
        await peers.close()
        await server.stop(None)
        closed.close()
