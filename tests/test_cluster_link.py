"""One connection per host, a host that cannot reach the database says so, and a
killed host is known dead (and its slot free) long before its lease runs out.

One test, one cluster (to keep `make test` short): hosts a and b on the real
PostgreSQL with a long host_ttl (so that nothing below can be the lease running
out), and s pointed at a port where something accepts and at once closes every
connection (a database that is not there), counting the connects.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from backend_proc import free_port
from cli_proc import modeld
from cluster_proc import after, cluster_toml, db_rows, event, load_on, running_cluster
from daemon_proc import DaemonProc, start_daemon, write_config
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.cluster.schema import HOST_LOCK, host_key
from modeld.policy.reconnect import attempts_bound

pytestmark = pytest.mark.timeout(120)


@dataclass
class Sink:
    """Accepts TCP connections and closes them at once; remembers when each came."""

    port: int
    times: list[float]


@contextlib.asynccontextmanager
async def closing_port() -> AsyncIterator[Sink]:
    sink = Sink(free_port(), [])

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sink.times.append(time.monotonic())
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", sink.port)
    try:
        yield sink
    finally:
        server.close()
        await server.wait_closed()


async def start_silent(tmp_path: Path, port: int) -> DaemonProc:
    folder = tmp_path / "s"
    folder.mkdir()
    dsn = f"postgresql://root@127.0.0.1:{port}/nothing"
    config, addr = write_config(folder, cluster_toml(dsn, "s", ttl=2.0))
    return await start_daemon(config, addr)


async def connections(dsn: str) -> dict[str, int]:
    rows = await db_rows(
        dsn,
        "SELECT application_name AS name, count(*) AS n FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name LIKE 'modeld%' "
        "GROUP BY application_name",
    )
    per_host: dict[str, int] = {}
    for row in rows:
        host = row["name"].rsplit("/", 1)[-1]
        per_host[host] = per_host.get(host, 0) + row["n"]
    return per_host


TTL = 10.0


async def test_one_connection_a_silent_host_and_a_death_seen_at_once(
    tmp_path: Path, pg_dsn: str
) -> None:
    async with (
        closing_port() as sink,
        running_cluster(tmp_path, pg_dsn, ["a", "b"], ttl=TTL) as hosts,
    ):
        # b is whichever leads (it runs the death check), a the other.
        b_id = await first_leader(hosts)
        a_id = "a" if b_id == "b" else "b"
        a, b = hosts[a_id], hosts[b_id]
        silent = await start_silent(tmp_path, sink.port)
        try:
            # At start, before any backoff: the warning names the database and the cause.
            warned = await silent.wait_log(event("cluster_db_unreachable", attempts=1), 10)
            assert f"127.0.0.1:{sink.port}" in warned["where"]
            assert "cluster.dsn" in warned["hint"]
            # Every duty of a and b, claims and specs included, on one connection each.
            replica = await load_on(b, a_id)
            reply = await a.stub.Route(pb.RouteRequest(model="echo"), timeout=10)
            assert reply.replica_id == replica.id
            await a.stub.Release(pb.ReleaseRequest(lease_id=reply.lease_id), timeout=10)
            spec = pb.ModelSpec(name="shared", backend="echo")
            await b.stub.PutModel(pb.PutModelRequest(spec=spec), timeout=10)
            assert await connections(pg_dsn) == {"a": 1, "b": 1}, "one connection per host"

            health = await silent.stub.Health(pb.HealthRequest(), timeout=10)
            link = health.cluster_database
            assert not link.up and link.down_since.seconds > 0 and link.attempts >= 1
            listed = await modeld("hosts", "--addr", silent.addr)
            assert listed.code == 0, listed.err
            assert listed.out.startswith("database unreachable since "), listed.out
            assert f"127.0.0.1:{sink.port}" in listed.out
            # The others' view does not depend on it: they list each other, and it not.
            for daemon in (a, b):
                seen = await daemon.stub.ListHosts(pb.ListHostsRequest(), timeout=10)
                assert sorted(h.host_id for h in seen.hosts) == ["a", "b"]
                assert seen.database.up
            fine = await modeld("hosts", "--addr", a.addr)
            assert "unreachable" not in fine.out

            # Reconnects back off with jitter: never more connects than the shortest
            # delays allow (a loaded machine only makes them fewer), and it keeps trying.
            began = sink.times[0]
            await silent.wait_log(event("cluster_db_unreachable", attempts=4), 20)
            elapsed = time.monotonic() - began
            assert 4 <= len(sink.times) <= attempts_bound(elapsed, cap=1.0), sink.times
            warnings = [e for e in silent.log if e.get("event") == "cluster_db_unreachable"]
            assert [w["attempts"] for w in warnings][:3] == [1, 2, 4]
        finally:
            await silent.stop()
            await silent.close()
        await changes_without_notification_are_still_seen(b, a_id, pg_dsn)
        await killed_host_seen_and_its_slot_freed(hosts, a_id, b_id, replica.id, pg_dsn)


async def changes_without_notification_are_still_seen(
    b: DaemonProc, a_id: str, pg_dsn: str
) -> None:
    """Rows changed behind the cluster's back (no NOTIFY, as when one is lost): the
    incremental resync reads the changed host, and a host row deleted is caught by the
    count and sum of epochs, which sends the next resync to a full read."""
    await db_rows(
        pg_dsn,
        'UPDATE modeld_hosts SET labels = \'{"zone": "z9"}\', '
        "version = nextval('modeld_version') WHERE host_id = $1",
        a_id,
    )
    # A host of the test's own, its liveness lock held here (else the death check
    # would end its lease, and it would be reaped).
    ghost = await asyncpg.connect(pg_dsn)
    epoch = await ghost.fetchval("SELECT nextval('modeld_epoch')")
    await ghost.execute("SELECT pg_advisory_lock($1, $2)", HOST_LOCK, host_key(epoch))
    await ghost.execute(
        "INSERT INTO modeld_hosts (host_id, epoch, address, role, lease_expires_at, version) "
        "VALUES ('ghost', $1, '127.0.0.1:9', 'node', now() + interval '1 hour', "
        "nextval('modeld_version'))",
        epoch,
    )

    async def listed() -> dict[str, pb.Host]:
        reply = await b.stub.ListHosts(pb.ListHostsRequest(), timeout=10)
        return {h.host_id: h for h in reply.hosts}

    await until(lambda h: "ghost" in h and dict(h[a_id].labels) == {"zone": "z9"}, listed)
    try:
        await ghost.execute("DELETE FROM modeld_hosts WHERE host_id = 'ghost'")
        await until(lambda h: "ghost" not in h, listed)
    finally:
        await ghost.close()


async def until(ok: Callable[[dict[str, pb.Host]], bool], read: Callable[..., Any]) -> None:
    """Read again until `ok`: at most three resync periods (host_ttl/3 each)."""
    deadline = time.monotonic() + TTL + 5
    while not ok(seen := await read()):
        assert time.monotonic() < deadline, seen
        await asyncio.sleep(0.2)  # the poll period of a condition with a deadline


async def killed_host_seen_and_its_slot_freed(
    hosts: dict[str, DaemonProc], a_id: str, b_id: str, replica_id: str, pg_dsn: str
) -> None:
    """a holds the only replica (max_replicas = 1); b leads. kill -9 of a: b's death
    check sees a's session gone, ends its lease, and a Route on b starts the model
    there, in a's freed slot, all before a's lease (host_ttl 10 s) would have run out."""
    a, b = hosts[a_id], hosts[b_id]
    dead = after(b, event("cluster_host_dead", host_id=a_id))
    # b's view, reread on the death check's notification.
    expired = after(b, event("cluster_host_expired", host_id=a_id))
    killed_at = time.monotonic()
    a.proc.kill()
    await a.proc.wait()
    await b.wait_log(dead, 10)
    await b.wait_log(expired, 10)
    seen = await b.stub.ListHosts(pb.ListHostsRequest(), timeout=10)
    assert {h.host_id: h.state for h in seen.hosts}[a_id] == pb.HOST_EXPIRED
    reply = await b.stub.Route(pb.RouteRequest(model="echo"), timeout=20)
    assert reply.cold_start and reply.lease_id.startswith(f"{b_id}~")
    assert reply.replica_id != replica_id
    assert time.monotonic() - killed_at < TTL
    claims = await db_rows(pg_dsn, "SELECT slot, state, replica_id FROM modeld_claims")
    assert [(r["slot"], r["state"], r["replica_id"]) for r in claims] == [
        (0, "serving", reply.replica_id)
    ]
    await b.stub.Release(pb.ReleaseRequest(lease_id=reply.lease_id), timeout=10)


async def first_leader(hosts: dict[str, DaemonProc]) -> str:
    """The host that leads (its `leader_elected`), waited for on every host at once."""
    waits = {
        asyncio.ensure_future(d.wait_log(event("leader_elected"), 30)): name
        for name, d in hosts.items()
    }
    done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return waits[next(iter(done))]
