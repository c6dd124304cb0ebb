"""The cluster's leader: the min_replicas decision (pure), and with real daemons and
PostgreSQL: min_replicas restored after a host's kill -9, and leader failover after
kill -9 and after SIGSTOP past host_ttl (the resumed one no longer leads).
"""

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cluster_proc import HOST_TTL, db_rows, running_cluster, until_db
from daemon_proc import DaemonProc
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.cluster.schema import LEADER_LOCK, migrate
from modeld.policy.cluster_replicas import Counted, Start, plan
from modeld.policy.host_placement import HostCapacity
from modeld.spec import ModelSpec
from modeld.state import ReplicaState
from pg import fresh_database

READY, DRAINING = ReplicaState.READY, ReplicaState.DRAINING
# The leader lock among the others every host's one connection holds (its liveness lock).
IS_LEADER_LOCK = (
    f"l.locktype = 'advisory' AND l.granted AND l.classid::bigint = {LEADER_LOCK >> 32} "
    f"AND l.objid::bigint = {LEADER_LOCK & 0xFFFFFFFF} AND l.objsubid = 1"
)
KEEP = '\n[models.keep]\nbackend = "echo"\nmin_replicas = 2\nmax_replicas = 2\n'


def spec(name: str = "m", low: int = 2, high: int = 2) -> ModelSpec:
    return ModelSpec(name=name, backend="echo", min_replicas=low, max_replicas=high)


def nodes(*ids: str, role: str = "node") -> list[HostCapacity]:
    return [HostCapacity(host_id=h, role=role, backends=frozenset({"echo"})) for h in ids]


# the decision


def test_missing_replicas_are_spread_over_hosts() -> None:
    decided = plan([spec()], [], nodes("a", "b", "c"))
    assert decided.starts == (Start("m", "a", 1), Start("m", "b", 1))
    assert not decided.unplaceable


def test_a_surviving_replica_counts_and_the_start_goes_elsewhere() -> None:
    decided = plan([spec()], [Counted("m", "a", READY)], nodes("a", "b"))
    assert decided.starts == (Start("m", "b", 1),)


def test_one_host_gets_the_total_it_should_hold() -> None:
    # Load{replicas} is the count wanted on that host: the one there plus one more.
    decided = plan([spec()], [Counted("m", "a", READY)], nodes("a"))
    assert decided.starts == (Start("m", "a", 2),)


def test_enough_replicas_busy_models_and_zero_minimums_start_nothing() -> None:
    have = [Counted("m", "a", READY), Counted("m", "b", ReplicaState.STARTING)]
    assert plan([spec()], have, nodes("a", "b")).starts == ()
    assert plan([spec()], [], nodes("a", "b"), busy={"m"}).starts == ()
    assert plan([spec(low=0)], [], nodes("a")).starts == ()


def test_draining_replicas_do_not_count() -> None:
    decided = plan([spec(low=1)], [Counted("m", "a", DRAINING)], nodes("a"))
    assert decided.starts == (Start("m", "a", 1),)


def test_hosts_that_refused_are_skipped() -> None:
    decided = plan([spec(low=1)], [], nodes("a", "b"), refused={"m": {"a"}})
    assert decided.starts == (Start("m", "b", 1),)


def test_no_node_host_is_unplaceable_with_the_reason() -> None:
    decided = plan([spec(low=1), spec("z", low=0)], [], nodes("r", role="router"))
    assert decided.starts == ()
    assert set(decided.unplaceable) == {"m"}
    assert "no node host" in decided.unplaceable["m"]


def test_placement_rules_apply_hosts_without_the_backend_are_never_chosen() -> None:
    bare = HostCapacity(host_id="a", role="node")
    decided = plan([spec(low=1)], [], [bare, *nodes("b")])
    assert decided.starts == (Start("m", "b", 1),)
    decided = plan([spec(low=1)], [], [bare])
    assert "no host has backend 'echo'" in decided.unplaceable["m"]


def test_binpack_puts_the_missing_replicas_together() -> None:
    decided = plan([spec(high=2)], [], nodes("a", "b"), default_mode="binpack")
    assert decided.starts == (Start("m", "a", 2),)


def test_models_are_counted_apart() -> None:
    have = [Counted("x", "a", READY), Counted("x", "b", READY)]
    decided = plan([spec("m", low=1), spec("x", low=2)], have, nodes("a", "b"))
    assert decided.starts == (Start("m", "a", 1),)


# real daemons


def event(name: str, **fields: object) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("event") == name and all(e.get(k) == v for k, v in fields.items())


def after(daemon: DaemonProc, match: Callable[[dict[str, Any]], bool]) -> Callable[..., Any]:
    seen = {id(e) for e in daemon.log}
    return lambda e: id(e) not in seen and match(e)


async def first_log(
    daemons: list[DaemonProc], matchers: list[Callable[..., Any]], limit_s: float
) -> DaemonProc:
    """The daemon whose matching line comes first (the others' waits are cancelled)."""
    waits = {
        asyncio.ensure_future(d.wait_log(m, limit_s)): d
        for d, m in zip(daemons, matchers, strict=True)
    }
    done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    winner = next(iter(done))
    winner.result()
    return waits[winner]


async def leader_of(hosts: dict[str, DaemonProc]) -> str:
    daemons = list(hosts.values())
    won = await first_log(daemons, [event("leader_elected")] * len(daemons), 20)
    return next(h for h, d in hosts.items() if d is won)


async def ready_keep(dsn: str, count: int, limit_s: float, exclude: str = "") -> list[Any]:
    """Wait (polling the database, which has no event to wait on) for `count` READY
    replicas of model keep on hosts other than `exclude`."""
    deadline = time.monotonic() + limit_s
    while True:
        rows = await db_rows(
            dsn,
            "SELECT host_id, replica_id FROM modeld_replicas "
            "WHERE model = 'keep' AND state = 'READY' AND host_id <> $1",
            exclude,
        )
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.2)


@pytest.mark.timeout(120)
async def test_min_replicas_is_restored_on_another_host_after_kill9(
    tmp_path: Path, pg_dsn: str
) -> None:
    async with running_cluster(tmp_path, pg_dsn, ["a", "b", "c"], extra=KEEP) as hosts:
        leader = await leader_of(hosts)
        rows = await ready_keep(pg_dsn, 2, 30)
        assert len(rows) == 2
        # Spread: the two replicas are on two hosts; no host kept a count of its own
        # (that would be 2 per host).
        assert len({r["host_id"] for r in rows}) == 2
        assert len(await db_rows(pg_dsn, "SELECT 1 FROM modeld_replicas")) == 2
        victim = next(r["host_id"] for r in rows if r["host_id"] != leader)
        dead = hosts[victim]
        started = time.monotonic()
        dead.proc.kill()
        # Its backends die with it (PR_SET_PDEATHSIG), as a dead machine's would.
        await dead.proc.wait()
        rows = await ready_keep(pg_dsn, 2, 40, exclude=victim)
        assert len(rows) == 2, rows
        print(f"min_replicas restored {time.monotonic() - started:.1f}s after kill -9")
        total = await db_rows(pg_dsn, "SELECT 1 FROM modeld_replicas WHERE model = 'keep'")
        survivors = [d for h, d in hosts.items() if h != victim]
        assert len(total) <= 3  # the dead host's row until it is reaped; never more
        reply = await survivors[0].stub.Route(pb.RouteRequest(model="keep"), timeout=30)
        assert not reply.cold_start


@pytest.mark.timeout(90)
async def test_kill9_of_the_leader_elects_another_within_host_ttl(
    tmp_path: Path, pg_dsn: str
) -> None:
    async with running_cluster(tmp_path, pg_dsn, ["a", "b", "c"]) as hosts:
        name = await leader_of(hosts)
        others = [d for h, d in hosts.items() if h != name]
        matchers = [after(d, event("leader_elected")) for d in others]
        started = time.monotonic()
        hosts[name].proc.kill()
        await first_log(others, matchers, HOST_TTL + 10)
        took = time.monotonic() - started
        print(f"new leader {took:.2f}s after kill -9 of the leader (host_ttl {HOST_TTL}s)")
        assert took < HOST_TTL + 3


@pytest.mark.timeout(90)
@pytest.mark.long
async def test_sigstop_past_ttl_unseats_the_leader_and_the_resumed_one_steps_down(
    tmp_path: Path, pg_dsn: str
) -> None:
    async with running_cluster(tmp_path, pg_dsn, ["a", "b"]) as hosts:
        name = await leader_of(hosts)
        stopped = hosts[name]
        other_name = "b" if name == "a" else "a"
        other = hosts[other_name]
        elected = after(other, event("leader_elected"))
        unseated = after(other, event("leader_unseated"))
        lost = after(stopped, event("leader_lost"))
        started = time.monotonic()
        stopped.proc.send_signal(signal.SIGSTOP)
        try:
            await other.wait_log(elected, 2 * HOST_TTL + 10)
            took = time.monotonic() - started
            await other.wait_log(unseated, 1)
        finally:
            resumed_at = len(stopped.log)
            stopped.proc.send_signal(signal.SIGCONT)
        print(f"new leader {took:.2f}s after SIGSTOP of the leader (host_ttl {HOST_TTL}s)")
        assert took < HOST_TTL + 5
        await stopped.wait_log(lost, 10)
        # Let the resumed host run a few of its rounds, then check it never led again.
        # Back in the cluster: its row renewed (same epoch, not yet reaped) or registered
        # again (reaped meanwhile); either way it is live and not the leader.
        await until_db(
            pg_dsn,
            f"SELECT 1 FROM modeld_hosts WHERE host_id = '{name}' AND NOT gone "
            "AND lease_expires_at > now()",
            lambda rows: len(rows) == 1,
            10,
        )
        holder = await db_rows(
            pg_dsn,
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            f"WHERE {IS_LEADER_LOCK} AND a.application_name "
            "LIKE 'modeld-leader/%' AND a.datname = current_database()",
        )
        assert [r["application_name"].rsplit("/", 1)[1] for r in holder] == [other_name]
        acted = [
            e
            for e in stopped.log[resumed_at:]
            if e.get("event") in ("leader_elected", "min_replicas_start")
        ]
        assert acted == []


@pytest.fixture
async def other_dsn() -> AsyncIterator[str]:
    """A second database on the same server: a second, unrelated cluster."""
    async with fresh_database() as dsn:
        yield dsn


LEADER_SESSIONS = (
    f"SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE {IS_LEADER_LOCK} "
    "AND a.datname = current_database() AND a.application_name LIKE 'modeld-leader/%'"
)


@pytest.mark.timeout(120)
async def test_a_cluster_never_unseats_the_leader_of_another_database(
    tmp_path: Path, pg_dsn: str, other_dsn: str
) -> None:
    """pg_locks lists the locks of every database: a follower that judged another
    database's leader by its own host table would end that leader's session."""
    conn = await asyncpg.connect(other_dsn)
    try:
        await migrate(conn)
        # Epochs that x's host table does not have, so that they look dead there.
        await conn.execute("SELECT setval('modeld_epoch', 1000)")
    finally:
        await conn.close()
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
    async with running_cluster(tmp_path / "y", other_dsn, ["solo"]) as y:
        solo = y["solo"]
        await solo.wait_log(event("leader_elected"), 20)
        before = await db_rows(other_dsn, LEADER_SESSIONS)
        assert len(before) == 1
        async with running_cluster(tmp_path / "x", pg_dsn, ["a", "b"]) as x:
            await leader_of(x)
            # A few seconds of x's follower looking up the holder every host_ttl/3.
            replica = (await x["a"].stub.Load(pb.LoadRequest(model="echo", host="b"))).replicas[0]
            await x["a"].wait_log(
                lambda e: (
                    e.get("event") == "cluster_view_changed"
                    and f"b/{replica.id}" in e.get("ready", [])
                ),
                10,
            )
            await x["b"].stub.Unload(pb.UnloadRequest(model="echo"), timeout=30)
            assert not any(e.get("event") == "leader_unseated" for d in x.values() for e in d.log)
        assert await db_rows(other_dsn, LEADER_SESSIONS) == before
        assert not any(e.get("event") == "leader_lost" for e in solo.log)
