"""An idle heartbeat round is one database transaction, the leader election's part
(a follower's try, the leader's check and its death check) included, as
pg_stat_database counts it and as the link's own counter does; and a follower that
finds the leader's connection gone leads after its next round, the one after it
ending the dead host's lease.

The membership code the daemons run, in the test process, driven round by round
(no loops): hosts a and b on a fresh database, with a fake clock so that nothing
expires by this process's clock and the leader's death check is allowed at once.
"""

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import pytest

from modeld.clock import FakeClock
from modeld.cluster.election import Election
from modeld.cluster.leader import DEATH_POLL_S
from modeld.cluster.link import Link, _TransactionTally
from modeld.cluster.membership import Membership
from modeld.config import ClusterConfig
from modeld.ops.events import EventBus

pytestmark = pytest.mark.timeout(60)
# Long enough that no lease runs out by the database's clock during the test.
TTL = 30.0


@dataclass
class Member:
    membership: Membership
    leads: list[bool] = field(default_factory=list)

    @property
    def link(self) -> Link:
        return self.membership.link

    async def round(self) -> None:
        await self.membership.keep_alive_round()


@contextlib.asynccontextmanager
async def member(dsn: str, host_id: str, clock: FakeClock) -> AsyncIterator[Member]:
    cfg = ClusterConfig(dsn, "", host_id, f"127.0.0.1:{len(host_id)}", "127.0.0.1", host_ttl=TTL)
    one = Member(Membership(cfg, dsn, clock, EventBus(), list))
    election = Election(one.link, host_id, 5.0, after=one.leads.append)
    await one.link.start()
    one.membership.take_part(election)
    try:
        yield one
    finally:
        await one.membership.close()


async def flush(link: Link) -> None:
    """This session's statistics go to pg_stat_database before the reply, this
    statement's own transaction with them (a session flushes only when it read or
    wrote a table since its last flush: this one reads one)."""
    await link.fetchval("SELECT pg_stat_force_next_flush(), (SELECT count(*) FROM modeld_hosts)")


async def flushed(link: Link) -> tuple[int, int]:
    """(the database's transactions, this link's count), each up to the same point:
    this session's flush and every statement before it (the link has logged those)."""
    await flush(link)
    counted = link.transactions
    total = await link.fetchval(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database "
        "WHERE datname = current_database()"
    )
    return int(total), counted


async def transactions_of_rounds(one: Member, rounds: int) -> tuple[int, int]:
    """What `rounds` rounds of `one` cost, by the database and by its link."""
    total, counted = await flushed(one.link)
    for _ in range(rounds):
        await one.round()
    total2, counted2 = await flushed(one.link)
    # Between the two: the first read and the second flush, as well as the rounds.
    return total2 - total - 2, counted2 - counted - 2


async def test_an_idle_round_is_one_transaction_and_a_follower_takes_over(pg_dsn: str) -> None:
    clock = FakeClock()
    async with member(pg_dsn, "a", clock) as a, member(pg_dsn, "b", clock) as b:
        await a.round()  # registers, reads everything, takes the free lock on its own
        await b.round()
        assert (a.leads, b.leads) == ([True], [False])
        # Past the others' reconnect window: the leader's heartbeat checks for deaths.
        clock.advance(a.link.cap + 6)
        for one in (a, b, a, b):
            await one.round()  # idle rounds, each statement prepared once
        await flush(b.link)  # b quiet from here
        assert await transactions_of_rounds(a, 3) == (3, 3), "the leader's round"
        assert a.membership.death_check_due(DEATH_POLL_S) > 0  # it checked in the round
        await flush(a.link)  # a quiet from here
        assert await transactions_of_rounds(b, 3) == (3, 3), "a follower's round"
        assert a.leads[-1] and not any(b.leads)

        # The leader's connection closes (as at kill -9): b leads after its next round,
        # and the round after that (b's heartbeat, as the leader) ends a's lease.
        pid = await a.link.fetchval("SELECT pg_backend_pid()")
        await a.link.close()
        await gone(pg_dsn, pid)
        await b.round()
        assert b.leads[-1]
        await b.round()
        conn = await asyncpg.connect(pg_dsn)
        try:
            assert await conn.fetchval("SELECT gone FROM modeld_hosts WHERE host_id = 'a'")
        finally:
            await conn.close()


async def gone(dsn: str, pid: int) -> None:
    """Until the backend `pid` has exited (its locks released): waits for it."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET client_min_messages = error")  # "not a backend": gone
        await conn.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)
    finally:
        await conn.close()


@dataclass(frozen=True)
class Logged:
    query: str


def test_the_link_counts_transactions_as_postgresql_does() -> None:
    link = Link("postgresql://x/y", "h", 1.0, FakeClock(), "x")
    tally = _TransactionTally(link)
    for query in (
        "SELECT 1",  # one
        "BEGIN ISOLATION LEVEL READ COMMITTED",  # one, with what follows until COMMIT
        "SELECT 2",
        "SAVEPOINT s;",
        "ROLLBACK TO s;",
        "COMMIT;",
        "\n  WITH hb AS (UPDATE t SET x = 1) SELECT 1",  # one
        "BEGIN",  # one
        "SELECT 3",
        "ROLLBACK;",
        "LISTEN modeld_cluster",  # one
    ):
        tally(Logged(query))
    assert link.transactions == 5
