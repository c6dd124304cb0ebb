"""Who leads the cluster: the leader lock (leader.py says what the leader does).

Election. Every host, in each of its heartbeat rounds (every host_ttl/3;
membership.py), tries `pg_try_advisory_lock(LEADER_LOCK)` on its one connection
(link.py), named `modeld-leader/EPOCH/HOST_ID` (EPOCH being its membership epoch,
unique in the cluster). The try is part of the round's one statement (`Ballot.TRY`,
store.py), and so is a leader's confirmation (`Ballot.HOLD`): taking part in the
election costs an idle host no statement of its own. Only what is rare runs
statements here (`round` with no vote): the first round on a new connection or
epoch, unseating a dead leader, resigning.
The session that holds that lock is the leader. A session lock is released by
PostgreSQL when its connection closes, so a leader that exits or is kill -9'd is
replaced within host_ttl/3. A leader that stops without closing its connection
(SIGSTOP, a hung host, a partition that leaves the TCP connection open) keeps the
lock, so a follower that fails to take it also looks up the holder (pg_locks ⨝
pg_stat_activity) and, when the host row of the holder's epoch has expired or has
been reaped, ends the holder's session (`pg_terminate_backend`, waiting for it to
go) and takes the lock: a new leader within about host_ttl + host_ttl/3. All
modelds must therefore connect as the same database role (or one granted
pg_signal_backend), as they do when they share one DSN.

Fencing. A leader acts only right after a check on its own connection that it
still holds the lock and that its host row of its current epoch is unexpired
(within the heartbeat, the row as it was before that heartbeat renewed it); a
leader that was stopped and resumed fails that check (its session was ended, or
its row expired) and steps down before it does anything. A follower leads only on
a lock taken in the statement that renewed its row, or checked afterwards. A Load
sent in the short window between the check and its arrival is still bounded by the
target's own admission and max_replicas.
"""

import enum
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import structlog

from modeld.cluster.link import DB_ERRORS, Link
from modeld.cluster.schema import LEADER_LOCK, THIS_DB

log = structlog.get_logger(__name__)
# pg_locks shows a bigint advisory key as two 32-bit halves, with objsubid 1.
_CLASSID, _OBJID = LEADER_LOCK >> 32, LEADER_LOCK & 0xFFFFFFFF
_IS_LEADER_LOCK = (
    f"l.locktype = 'advisory' AND l.database = {THIS_DB} AND l.classid::bigint = {_CLASSID}"
    f" AND l.objid::bigint = {_OBJID} AND l.objsubid = 1 AND l.granted"
)

_MINE = f"EXISTS (SELECT 1 FROM pg_locks l WHERE {_IS_LEADER_LOCK} AND l.pid = pg_backend_pid())"


def holds_sql(host: str, epoch: str) -> str:
    """True when this session holds the lock and the host row (`host`, `epoch`: the
    statement's placeholders) is unexpired."""
    return f"""{_MINE}
   AND EXISTS (SELECT 1 FROM modeld_hosts WHERE host_id = {host} AND epoch = {epoch}
               AND lease_expires_at > now())"""


# Another session that holds the lock, and whether the host row of its epoch is live.
_HOLDER = f"""(SELECT a.pid, a.application_name FROM pg_locks l
    JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE {_IS_LEADER_LOCK} AND l.pid <> pg_backend_pid()) AS h"""
_HOLDER_COLUMNS = """h.pid AS holder_pid, h.application_name AS holder_name,
  EXISTS (SELECT 1 FROM modeld_hosts WHERE epoch::text = split_part(h.application_name, '/', 2)
          AND lease_expires_at > now()) AS holder_live"""
# A try that never takes the lock twice (an advisory lock counts its takers: one
# unlock would not free it).
_TRY_LOCK = f"WHEN {_MINE} THEN true ELSE pg_try_advisory_lock({LEADER_LOCK}) END"
# What a heartbeat (store.py) adds to its statement, by ballot. `hb` is its renewal
# (a row when it renewed), $3 and $4 the host and epoch, $6 the session's name for
# TRY: set in the same statement, before the try (a CASE's branches run in order),
# so that the lock is never held under a name the followers cannot judge.
TRY_COLUMNS = f"""CASE WHEN NOT EXISTS (SELECT 1 FROM hb) THEN NULL
  WHEN set_config('application_name', $6, false) IS NULL THEN NULL
  {_TRY_LOCK} AS got, {_HOLDER_COLUMNS}"""
TRY_FROM = f"FROM (SELECT 1) AS one LEFT JOIN {_HOLDER} ON true"
# All parts of one statement see the rows as they were before it: the host row here
# is the one the heartbeat is renewing, as it was.
HOLD_COLUMNS = f"{holds_sql('$3', '$4')} AS got"
_HOLDS = f"SELECT {holds_sql('$1', '$2')}"
_TRY = f"SELECT CASE {_TRY_LOCK} AS got, {_HOLDER_COLUMNS} {TRY_FROM}"
_UNLOCK = f"SELECT pg_advisory_unlock({LEADER_LOCK})"


class Ballot(enum.Enum):
    """What a heartbeat carries for the election."""

    TRY = "try"  # a follower: take the lock when it is free
    HOLD = "hold"  # the leader: is the lock still this session's, its row still live?


@dataclass(frozen=True)
class Vote:
    """What the heartbeat's statement said: `got` the lock (TRY) or still holds it (HOLD);
    for a TRY that failed, the session that holds it (if any) and whether its host is live."""

    ballot: Ballot
    got: bool
    holder_pid: int | None = None
    holder_name: str = ""
    holder_live: bool = True

    @classmethod
    def of(cls, ballot: Ballot, row: asyncpg.Record) -> "Vote":
        if ballot is Ballot.HOLD:
            return cls(ballot, bool(row["got"]))
        return cls(
            ballot,
            bool(row["got"]),
            row["holder_pid"],
            row["holder_name"] or "",
            bool(row["holder_live"]),
        )

    @property
    def contestable(self) -> bool:
        """A TRY that failed may still win: the lock was released meanwhile, or the host
        row of its holder's epoch is no longer live."""
        return self.holder_pid is None or (
            not self.holder_live and _epoch_of(self.holder_name) is not None
        )


class Election:
    """The leader lock on this host's link; `round` settles one round of the election,
    and `after` hears, after each, whether this host leads."""

    def __init__(
        self,
        link: Link,
        host_id: str,
        timeout: float,
        after: Callable[[bool], None] = lambda _leads: None,
    ) -> None:
        self._link = link
        self._host = host_id
        self._timeout = timeout
        self._after = after
        # The epoch this host leads under; None while it does not lead.
        self.leading: int | None = None
        # (link generation, epoch) the session was last named for.
        self._named: tuple[int, int] | None = None
        self._closed = False

    def ballot(self, epoch: int) -> Ballot | None:
        """What the next heartbeat under `epoch` can carry; None: `round` has statements
        of its own to run (leading under an earlier epoch, or stopping)."""
        if self._closed:
            return None
        if self.leading is None:
            return Ballot.TRY
        return Ballot.HOLD if self.leading == epoch else None

    def session_name(self, epoch: int) -> str:
        return f"modeld-leader/{epoch}/{self._host}"[:63]

    async def round(self, epoch: int | None, vote: Vote | None) -> None:
        """Settle this round: `vote` is what the heartbeat under `epoch` said, None when
        it carried none (then the lock is kept or taken here; `epoch` None: this host is
        not registered, so never the leader)."""
        if self._closed:
            return
        try:
            if vote is None:
                await self._hold(epoch)
            elif epoch is not None:
                await self._counted(epoch, vote)
        except DB_ERRORS as exc:
            # A lost connection took the lock with it (a reconnect is a new session).
            self._become(None, f"{type(exc).__name__}: {exc}"[:200])
        if self.closed():
            # Closed while this round ran: what it settled must not outlive the close.
            self._become(None, "modeld is stopping")
            return
        self._after(self.leading is not None)

    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        self._closed = True
        self._become(None, "modeld is stopping")

    async def _counted(self, epoch: int, vote: Vote) -> None:
        if vote.ballot is Ballot.HOLD:
            if not vote.got:
                async with self._link.acquire() as conn:
                    await self._resign(conn, "its lock or its host row of this epoch is gone")
            return
        if vote.got:
            self._become(epoch)  # taken by the statement that renewed this host's row
        elif vote.contestable:
            # Released meanwhile, or its holder is dead: statements of their own (rare).
            async with self._link.acquire() as conn:
                if await self._won(conn, epoch, vote):
                    self._become(epoch)

    async def _hold(self, epoch: int | None) -> None:
        async with self._link.acquire() as conn:
            if epoch is None:
                await self._resign(conn, "this host is not registered in the cluster")
            elif self.leading is not None:
                if await self._confirm(conn, epoch):
                    self._become(epoch)
                else:
                    await self._resign(conn, "its lock or its host row of this epoch is gone")
            elif await self._take(conn, epoch):
                self._become(epoch)

    async def _confirm(self, conn: asyncpg.Connection, epoch: int) -> bool:
        if epoch != self.leading:
            # Re-registered under a new epoch: followers judge this session by its name.
            await self._name(conn, epoch)
        return bool(await conn.fetchval(_HOLDS, self._host, epoch))

    async def _take(self, conn: asyncpg.Connection, epoch: int) -> bool:
        await self._name(conn, epoch)
        row = await conn.fetchrow(_TRY)
        assert row is not None
        return await self._won(conn, epoch, Vote.of(Ballot.TRY, row))

    async def _won(self, conn: asyncpg.Connection, epoch: int, vote: Vote) -> bool:
        """After a try: the lock, when it was free or its holder dead, and this host's
        row of `epoch` live."""
        got = vote.got
        if not got and await self._unseat_dead(conn, vote):
            got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK)
        if not got:
            return False
        if await conn.fetchval(_HOLDS, self._host, epoch):
            return True
        # Our own host row of this epoch has expired: we must not lead on it.
        await conn.execute(_UNLOCK)
        return False

    async def _name(self, conn: asyncpg.Connection, epoch: int) -> None:
        """Once per connection and epoch: renaming is a statement of its own here."""
        if self._named == (self._link.generation, epoch):
            return
        name = self.session_name(epoch)
        await conn.execute("SELECT set_config('application_name', $1, false)", name)
        self._named = (self._link.generation, epoch)

    async def _unseat_dead(self, conn: asyncpg.Connection, vote: Vote) -> bool:
        """End the holder's session when its host's row of its epoch has expired."""
        if vote.holder_pid is None:
            return True  # released meanwhile
        if not vote.contestable:
            return False
        wait_ms = int(self._timeout * 500)
        ended = await conn.fetchval("SELECT pg_terminate_backend($1, $2)", vote.holder_pid, wait_ms)
        log.warning(
            "leader_unseated",
            host_id=self._host,
            holder=vote.holder_name,
            holder_pid=vote.holder_pid,
            ended=bool(ended),
        )
        return bool(ended)

    def _become(self, epoch: int | None, why: str = "") -> None:
        """The one place leadership changes, logged once per change."""
        if epoch == self.leading:
            return
        if epoch is None:
            log.warning("leader_lost", host_id=self._host, epoch=self.leading, reason=why)
        elif self.leading is None:
            log.info("leader_elected", host_id=self._host, epoch=epoch)
        self.leading = epoch

    async def _resign(self, conn: asyncpg.Connection, why: str) -> None:
        if self.leading is None:
            return
        self._become(None, why)
        # Only the leader lock: the host's liveness lock shares this session.
        await conn.execute(_UNLOCK)


def _epoch_of(application_name: str) -> int | None:
    parts = application_name.split("/", 2)
    if len(parts) < 2 or parts[0] != "modeld-leader" or not parts[1].isdigit():
        return None
    return int(parts[1])
