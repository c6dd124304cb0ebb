"""One leader for the cluster, and what it does: keep every model's min_replicas up.

Election. Every host, every host_ttl/3, tries `pg_try_advisory_lock(LEADER_LOCK)`
on its one connection (link.py), named `modeld-leader/EPOCH/HOST_ID` (EPOCH being
its membership epoch, unique in the cluster).
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
still holds the lock and that its host row of its current epoch is unexpired;
a leader that was stopped and resumed fails that check (its session was ended,
or its row expired) and steps down before it does anything. A Load sent in the
short window between the check and its arrival is still bounded by the target's
own admission and max_replicas.

min_replicas. In cluster mode it counts the whole cluster, and only the leader
tops it up (hosts do not keep it locally; server.py). Each round the leader counts
the STARTING..READY replicas of every model it knows on hosts whose lease is
current, asks policy/cluster_replicas.py where the missing ones go, and sends
`Load{model, replicas, host}` to those hosts (forwarded; to itself too). A model
with a Load in flight is not planned again until it ends; a host that refused or
failed a Load of a model is skipped for that model for a while; a Load to a host
that leaves the cluster is cancelled. While the database link is down, or back
for under one host_ttl, the view cannot tell dead hosts from live ones, and the
leader starts nothing.
"""

import asyncio

import asyncpg
import structlog

from modeld.clock import Clock
from modeld.cluster.forward import Load, Peers
from modeld.cluster.hostcap import capacities
from modeld.cluster.link import DB_ERRORS, Link
from modeld.cluster.membership import Membership
from modeld.cluster.schema import LEADER_LOCK
from modeld.cluster.store import THIS_DB
from modeld.errors import ModeldError
from modeld.policy.cluster_replicas import Counted, Start, plan
from modeld.state import ReplicaState
from modeld.storage.catalog import Catalog

log = structlog.get_logger(__name__)
# pg_locks shows a bigint advisory key as two 32-bit halves, with objsubid 1.
_CLASSID, _OBJID = LEADER_LOCK >> 32, LEADER_LOCK & 0xFFFFFFFF
_THIS_DB = THIS_DB
_HOLDS = f"""
SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND database = {_THIS_DB}
               AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 1
               AND pid = pg_backend_pid() AND granted)
   AND EXISTS (SELECT 1 FROM modeld_hosts WHERE host_id = $3 AND epoch = $4
               AND lease_expires_at > now())
"""
_HOLDER = f"""
SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.database = {_THIS_DB} AND l.classid::bigint = $1
  AND l.objid::bigint = $2 AND l.objsubid = 1 AND l.granted
"""
_UNLOCK = f"SELECT pg_advisory_unlock({LEADER_LOCK})"
# A follower's round in one statement: try the lock and, when another session holds
# it, who that is and whether the host row of its epoch is still live.
_TRY = f"""
SELECT pg_try_advisory_lock({LEADER_LOCK}) AS got, h.pid, h.application_name,
  EXISTS (SELECT 1 FROM modeld_hosts WHERE epoch::text = split_part(h.application_name, '/', 2)
          AND lease_expires_at > now()) AS live
FROM (SELECT 1) AS one LEFT JOIN ({_HOLDER.strip()} AND l.pid <> pg_backend_pid()) AS h ON true
"""
# How long a host that refused or failed a Load of a model is not asked again for it.
REFUSED_FOR = 30.0
# How long the leader counts a replica its Load returned before the view shows it.
LOADED_GRACE = 10.0
LOAD_WAIT = 600.0
# How often the leader looks for hosts whose process is gone (their liveness lock is
# free): one cheap statement for the whole cluster, so a kill -9 is seen within this.
DEATH_POLL_S = 0.5


class Election:
    """The leader lock on this host's link; `hold` runs one round of the election."""

    def __init__(self, link: Link, host_id: str, timeout: float) -> None:
        self._link = link
        self._host = host_id
        self._timeout = timeout
        # The epoch this host leads under; None while it does not lead.
        self.leading: int | None = None
        # (link generation, epoch) the session was last named for.
        self._named: tuple[int, int] | None = None

    async def hold(self, epoch: int | None) -> bool:
        """Keep or take the lock for `epoch` (None: not registered, so never the leader)."""
        try:
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
        except DB_ERRORS as exc:
            # A lost connection took the lock with it (a reconnect is a new session).
            self._become(None, f"{type(exc).__name__}: {exc}"[:200])
        return self.leading is not None

    async def close(self) -> None:
        self._become(None, "modeld is stopping")

    async def _confirm(self, conn: asyncpg.Connection, epoch: int) -> bool:
        if epoch != self.leading:
            # Re-registered under a new epoch: followers judge this session by its name.
            await self._name(conn, epoch)
        return bool(await conn.fetchval(_HOLDS, _CLASSID, _OBJID, self._host, epoch))

    async def _take(self, conn: asyncpg.Connection, epoch: int) -> bool:
        await self._name(conn, epoch)
        row = await conn.fetchrow(_TRY, _CLASSID, _OBJID)
        got = bool(row is not None and row["got"])
        if not got and row is not None and await self._unseat_dead(conn, row):
            got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK)
        if not got:
            return False
        if await conn.fetchval(_HOLDS, _CLASSID, _OBJID, self._host, epoch):
            return True
        # Our own host row of this epoch has expired: we must not lead on it.
        await conn.execute(_UNLOCK)
        return False

    async def _name(self, conn: asyncpg.Connection, epoch: int) -> None:
        """Once per connection and epoch: renaming is a statement, and rounds are idle work."""
        if self._named == (self._link.generation, epoch):
            return
        name = f"modeld-leader/{epoch}/{self._host}"[:63]
        await conn.execute("SELECT set_config('application_name', $1, false)", name)
        self._named = (self._link.generation, epoch)

    async def _unseat_dead(self, conn: asyncpg.Connection, row: asyncpg.Record) -> bool:
        """End the holder's session when its host's row of its epoch has expired."""
        if row["pid"] is None:
            return True  # released meanwhile
        if _epoch_of(row["application_name"] or "") is None or row["live"]:
            return False
        wait_ms = int(self._timeout * 500)
        ended = await conn.fetchval("SELECT pg_terminate_backend($1, $2)", row["pid"], wait_ms)
        log.warning(
            "leader_unseated",
            host_id=self._host,
            holder=row["application_name"],
            holder_pid=row["pid"],
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


class Leader:
    """Runs the election every `interval`; while leading, tops up min_replicas."""

    def __init__(
        self,
        *,
        host_id: str,
        clock: Clock,
        membership: Membership,
        catalog: Catalog,
        peers: Peers,
        interval: float,
        timeout: float,
        placement: str,
    ) -> None:
        self.election = Election(membership.link, host_id, timeout)
        self._placement = placement
        self._clock = clock
        self._membership = membership
        self._catalog = catalog
        self._peers = peers
        self._interval = interval
        # (model, host) -> the Load this leader sent and is waiting for.
        self._loads: dict[tuple[str, str], asyncio.Task[None]] = {}
        # (model, host) -> monotonic time until which that host is not asked again.
        self._refused: dict[tuple[str, str], float] = {}
        # replica id -> a replica a Load returned, counted until the view shows it.
        self._loaded: dict[str, tuple[Counted, float]] = {}
        self._unplaceable: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._deaths: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = self._membership.spawn(self._run(), "cluster-leader")
        self._deaths = self._membership.spawn(self._watch_deaths(), "cluster-deaths")

    async def close(self) -> None:
        for task in (self._task, self._deaths):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._cancel_loads()
        await self.election.close()

    async def _run(self) -> None:
        while True:
            try:
                if await self.election.hold(self._membership.epoch):
                    self.keep_min_replicas()
                else:
                    self._cancel_loads()
            except Exception:
                log.exception("leader_round_failed")
            await asyncio.sleep(self._interval)

    async def _watch_deaths(self) -> None:
        """While leading: end the leases of hosts whose connection closed. Not while this
        host's own link is fresh (the others may not have reconnected, and relocked, yet)."""
        while True:
            await asyncio.sleep(DEATH_POLL_S)  # the poll period, not a synchronisation
            if self.election.leading is None or not self._membership.others_back():
                continue
            try:
                await self._membership.mark_dead()
            except Exception:
                log.exception("cluster_death_check_failed")

    def keep_min_replicas(self) -> None:
        """One round: count, plan, send the Loads (they run on their own)."""
        if self._membership.trust_expired():
            return  # dead hosts cannot be told from live ones now
        view = self._membership.view
        now = self._clock.monotonic()
        alive = {h for h in view.hosts if view.alive(h, now, trust_expired=False)}
        self._forget(now, alive)
        counted = {
            r.id: Counted(r.model, r.host_id, r.state)
            for r in view.replicas.values()
            if r.host_id in alive
        }
        for replica_id, (replica, _) in self._loaded.items():
            if replica.host_id in alive:
                counted.setdefault(replica_id, replica)
        refused: dict[str, set[str]] = {}
        for model, host_id in self._refused:
            refused.setdefault(model, set()).add(host_id)
        decided = plan(
            self._catalog.list(),
            counted.values(),
            capacities(view, now, trust_expired=False),
            busy={model for model, _ in self._loads},
            refused=refused,
            default_mode=self._placement,
        )
        if decided.unplaceable != self._unplaceable:
            for model, why in decided.unplaceable.items():
                log.warning("min_replicas_unplaceable", model=model, reason=why)
            self._unplaceable = dict(decided.unplaceable)
        for start in decided.starts:
            self._send(start, view.hosts[start.host_id].address)

    def _forget(self, now: float, alive: set[str]) -> None:
        """Drop what is over: refusals and grace periods past, Loads to hosts gone."""
        self._refused = {k: until for k, until in self._refused.items() if until > now}
        self._loaded = {k: v for k, v in self._loaded.items() if v[1] > now}
        for (model, host_id), task in list(self._loads.items()):
            if host_id not in alive:
                log.info("min_replicas_load_abandoned", model=model, host_id=host_id)
                task.cancel()

    def _send(self, start: Start, address: str) -> None:
        log.info(
            "min_replicas_start", model=start.model, host_id=start.host_id, replicas=start.replicas
        )
        key = (start.model, start.host_id)
        self._loads[key] = asyncio.create_task(self._load(start, address))

    async def _load(self, start: Start, address: str) -> None:
        key = (start.model, start.host_id)
        request = Load(start.model, start.replicas, start.host_id, address)
        try:
            loaded = await self._peers.load(request, LOAD_WAIT)
        except ModeldError as exc:
            self._refused[key] = self._clock.monotonic() + REFUSED_FOR
            log.warning(
                "min_replicas_load_failed", model=start.model, host_id=start.host_id, error=str(exc)
            )
            return
        finally:
            if self._loads.get(key) is asyncio.current_task():
                del self._loads[key]
        until = self._clock.monotonic() + LOADED_GRACE
        for replica in loaded:
            counted = Counted(start.model, start.host_id, ReplicaState.READY)
            self._loaded[replica.id] = (counted, until)

    def _cancel_loads(self) -> None:
        for task in self._loads.values():
            task.cancel()
        self._loads.clear()
