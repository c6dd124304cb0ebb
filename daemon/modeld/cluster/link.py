"""This host's one connection to the cluster database, shared by every cluster duty.

Membership (heartbeats, replica rows, the view's reads), claims, shared specs and
the leader lock all run their statements here, one at a time (`acquire`), and
LISTEN on it: one connection per host, so one PostgreSQL with its default
`max_connections = 100` carries about 95 hosts rather than 17. Every statement is
short and none is held across network I/O other than its own round trip, so
sharing costs a caller at most the wait for one other statement.

Session state lives on this connection and dies with it, which is the point:
- the host's liveness lock (`HOST_LOCK`, keyed by its epoch, taken where it
  registers; membership.py): PostgreSQL releases it the moment a killed modeld's
  socket closes, which is how the cluster hears of a death in under a second;
- the leader lock (election.py), its tries folded into the heartbeat (membership.py);
- LISTEN (channels registered with `listen`, added again on every connect).

What the link runs is counted, for the metrics (`counts`), without asking the
database: its transactions as PostgreSQL counts them (`pg_stat_database`'s
xact_commit + xact_rollback: a statement outside BEGIN..COMMIT is one, a block is
one), the notifications it heard, its connects, and whether it has a connection.

A lost connection is reconnected with jittered exponential backoff
(policy/reconnect.py), so a database that comes back to a hundred hosts sees their
connects spread out. The link says it is down at once, at start too: a warning
`cluster_db_unreachable` at the first failed connect and again at each doubling of
the attempt count (so at most every CAP_S seconds x attempts, never silent), and
`state()` for Health and ListHosts ("unreachable since ...").
"""

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import structlog

from modeld.clock import Clock
from modeld.errors import RegistryError
from modeld.info import LinkState
from modeld.ops.tasks import Spawn, detached
from modeld.policy.reconnect import CAP_S, reconnect_delay

log = structlog.get_logger(__name__)
# What says the connection is gone (as opposed to a statement that failed on a live one).
BROKEN = (OSError, TimeoutError, asyncpg.InterfaceError)
DB_ERRORS = (*BROKEN, asyncpg.PostgresError)
# Warnings for a database that stays away: at these attempt counts, then every WARN_EVERY.
WARN_EVERY = 64
Listener = Callable[[Any, int, str, str], None]


class LinkDown(ConnectionError):
    """The link has no connection now (it is being re-established)."""


class Link:
    def __init__(
        self,
        dsn: str,
        host_id: str,
        timeout: float,
        clock: Clock,
        where: str,
        *,
        prepare: Callable[[asyncpg.Connection], Awaitable[object]] | None = None,
        rand: Callable[[], float] = random.random,
        spawn: Spawn = detached,
    ) -> None:
        self._spawn = spawn
        # Run on each new connection before anyone uses it (the schema's migrations).
        self._prepare = prepare
        self._dsn = dsn
        self._host = host_id
        self._timeout = timeout
        self._clock = clock
        self._rand = rand
        self.where = where
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._listeners: dict[str, Listener] = {}
        self._on_up: list[Callable[[], None]] = []
        self._lost = asyncio.Event()
        self._lost.set()
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._why = "not connected yet"
        self._down_since: float | None = clock.wall()
        self._attempts = 0
        # Monotonic time of the last (re)connect; bumped with each.
        self.back_at = clock.monotonic()
        self.generation = 0
        # What `counts` reports; plain integers, bumped on the event loop.
        self.transactions = 0
        self.notifications = 0
        # The longest wait between two connects: the others' links, cut by the same
        # outage, are back at most this long after ours.
        self.cap = min(CAP_S, max(timeout, 1.0))

    def listen(self, channel: str, callback: Listener) -> None:
        """LISTEN `channel` on every connection from now on (register before start)."""
        self._listeners[channel] = callback

    def on_up(self, callback: Callable[[], None]) -> None:
        """Called after every (re)connect: notifications sent meanwhile were lost."""
        self._on_up.append(callback)

    async def start(self) -> None:
        """One attempt now, so that a database away at start is said at start; then
        the reconnect task keeps trying."""
        await self._attempt()
        self._task = self._spawn(self._keep(), "cluster-link")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), self._timeout)
            except (*DB_ERRORS, asyncio.CancelledError):
                conn.terminate()

    def counts(self) -> dict[str, int]:
        """The link's counters (ops/metrics.py: modeld_cluster_db_*), by name."""
        return {
            "db_transactions": self.transactions,
            "db_notifications": self.notifications,
            "db_connects": self.generation,
        }

    @property
    def up(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def wait_up(self) -> None:
        """Returns once the link is up (at once when it is)."""
        await self._connected.wait()

    def state(self) -> LinkState:
        up = self.up
        return LinkState(
            up=up,
            down_since=None if up else self._down_since,
            error="" if up else self._why,
            where=self.where,
            attempts=self._attempts,
        )

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        """The connection, to this caller alone until the block ends; LinkDown when there
        is none. A connection-level failure inside the block starts a reconnect."""
        async with self._lock:
            conn = self._conn
            if conn is None or conn.is_closed():
                raise LinkDown(f"the cluster database is unreachable ({self._why})")
            try:
                yield conn
            except BROKEN as exc:
                self._broken(conn, f"{type(exc).__name__}: {exc}")
                raise

    async def fetchval(self, sql: str, *args: object) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchval(sql, *args, timeout=self._timeout)

    async def fetchrow(self, sql: str, *args: object) -> asyncpg.Record | None:
        async with self.acquire() as conn:
            return await conn.fetchrow(sql, *args, timeout=self._timeout)

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        async with self.acquire() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args, timeout=self._timeout)
            return rows

    # keeping the connection

    async def _keep(self) -> None:
        while True:
            await self._lost.wait()
            if self.up:
                self._lost.clear()
                continue
            # Jittered from the first retry on: a database that drops every host at once
            # (a restart) must not get all of them back in the same instant.
            delay = reconnect_delay(max(self._attempts, 1), self._rand(), cap=self.cap)
            await asyncio.sleep(delay)  # the backoff itself, not a synchronisation
            try:
                await self._attempt()
            except RegistryError as exc:
                self._attempts += 1
                self._why = str(exc)[:200]
                log.error("cluster_db_refused", host_id=self._host, error=self._why)

    async def _attempt(self) -> None:
        try:
            conn = await self._connect()
        except DB_ERRORS as exc:
            self._attempts += 1
            self._why = f"{type(exc).__name__}: {exc}"[:200]
            if self._attempts & (self._attempts - 1) == 0 or self._attempts % WARN_EVERY == 0:
                log.warning(
                    "cluster_db_unreachable",
                    host_id=self._host,
                    where=self.where,
                    error=self._why,
                    attempts=self._attempts,
                    hint="this host sees no other host and no other host sees it until it "
                    "connects; check cluster.dsn and that PostgreSQL accepts this host",
                )
            return
        was_down_attempts = self._attempts
        self._conn, self._attempts, self._down_since = conn, 0, None
        self._lost.clear()
        self._connected.set()
        self.generation += 1
        self.back_at = self._clock.monotonic()
        log.info(
            "cluster_db_up", host_id=self._host, where=self.where, after_attempts=was_down_attempts
        )
        for callback in self._on_up:
            callback()

    async def _connect(self) -> asyncpg.Connection:
        settings = {
            "application_name": f"modeld/{self._host}"[:63],
            "statement_timeout": str(int(self._timeout * 1000)),
            "lock_timeout": str(int(self._timeout * 500)),
        }
        conn = await asyncpg.connect(
            self._dsn,
            timeout=self._timeout,
            command_timeout=self._timeout,
            server_settings=settings,
        )
        conn.add_query_logger(_TransactionTally(self))
        try:
            if self._prepare is not None:
                await self._prepare(conn)
            for channel, callback in self._listeners.items():
                await conn.add_listener(channel, self._counted(callback))
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._terminated)
        return conn

    def _counted(self, callback: Listener) -> Listener:
        def heard(conn: Any, pid: int, channel: str, payload: str) -> None:
            self.notifications += 1
            callback(conn, pid, channel, payload)

        return heard

    def _terminated(self, conn: asyncpg.Connection) -> None:
        if conn is self._conn and not self._closing:
            self._broken(conn, "the connection closed")

    def _broken(self, conn: asyncpg.Connection | None, why: str) -> None:
        if conn is None or conn is not self._conn:
            return
        dead: asyncpg.Connection = conn
        self._conn = None
        self._connected.clear()
        self._why = why[:200]
        self._down_since = self._clock.wall()
        if not dead.is_closed():
            dead.terminate()
        log.warning("cluster_db_down", host_id=self._host, where=self.where, error=self._why)
        self._lost.set()


class _TransactionTally:
    """One connection's query log, replayed in order (asyncpg calls it after each query)
    to count transactions as PostgreSQL does; O(1) a query."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self._in_block = False

    def __call__(self, record: Any) -> None:
        words = record.query.split(None, 2)[:2]
        verb = words[0].rstrip(";").upper() if words else ""
        if verb in ("BEGIN", "START"):
            self._in_block = True
            self._link.transactions += 1
        elif verb in ("COMMIT", "END") or (verb == "ROLLBACK" and words[1:2] != ["TO"]):
            self._in_block = False
        elif not self._in_block:
            self._link.transactions += 1
