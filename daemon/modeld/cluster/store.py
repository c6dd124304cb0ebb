"""Every SQL statement of the membership, over this host's one link (link.py).

Each write is one short transaction on this host's own rows, fenced by its epoch;
no lock is held across anything but these statements. Reads return plain rows
for the membership to turn into the view.
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import asyncpg

from modeld.cluster.election import HOLD_COLUMNS, TRY_COLUMNS, TRY_FROM, Ballot, Vote
from modeld.cluster.link import Link
from modeld.cluster.schema import CHANNEL, HOST_LOCK, REAP_LOCK, THIS_DB, host_key
from modeld.cluster.view import HostFigures
from modeld.info import ReplicaInfo

# Free memory is published on this grid, so that noise in the readings is not a change.
MEMORY_GRID = 256 << 20


class PublishedRow(NamedTuple):
    """A replica as this host publishes it (the view's RemoteReplica on other hosts),
    derived from the supervisor's snapshot by `published`; its order is the SQL's."""

    replica_id: str
    model: str
    state: str
    address: str
    generation: int
    in_flight: int
    last_used: float  # wall clock seconds
    free_memory: int


def published(info: ReplicaInfo, free_memory: Mapping[int | None, int]) -> PublishedRow:
    device = int(info.gpu.split(",")[0]) if info.gpu else None
    return PublishedRow(
        info.id,
        info.model,
        info.state.value,
        info.address,
        info.restarts,
        info.in_flight,
        # Wall-clock last use is derived from the monotonic one on every read and
        # jitters in its last digits: 10 ms is fine enough for the picker.
        round(info.last_used or 0.0, 2),
        free_memory.get(device, 0) // MEMORY_GRID * MEMORY_GRID,
    )


# How a replica row is written, by the membership's publish and by a claim's bind
# (claims.py): a row is only ever overwritten by the host that owns it.
REPLICA_COLUMNS = """modeld_replicas (replica_id, host_id, epoch, model, state, address,
    generation, in_flight, last_used, free_memory, updated_at)"""
REPLICA_CONFLICT = """ON CONFLICT (replica_id) DO UPDATE SET
    epoch = EXCLUDED.epoch, model = EXCLUDED.model, state = EXCLUDED.state,
    address = EXCLUDED.address, generation = EXCLUDED.generation,
    in_flight = EXCLUDED.in_flight, last_used = EXCLUDED.last_used,
    free_memory = EXCLUDED.free_memory, updated_at = now()
WHERE modeld_replicas.host_id = EXCLUDED.host_id"""
_UPSERT = f"""
INSERT INTO {REPLICA_COLUMNS}
VALUES ($1, $9, $10, $2, $3, $4, $5, $6, $7, $8, now())
{REPLICA_CONFLICT}
"""
_HOSTS_JSON = """coalesce((SELECT json_agg(json_build_object(
      'host_id', host_id, 'epoch', epoch, 'address', address, 'role', role, 'labels', labels,
      'remaining', extract(epoch FROM lease_expires_at - now()), 'gone', gone,
      'backends', backends, 'gpu_free', gpu_free, 'gpu_total', gpu_total,
      'ram_free', ram_free, 'ram_total', ram_total, 'loaded', loaded,
      'max_loaded', max_loaded, 'evictable', evictable))
    FROM modeld_hosts WHERE {which}), '[]') AS hosts"""
_REPLICAS_JSON = """coalesce((SELECT json_agg(json_build_object(
      'id', replica_id, 'host_id', host_id, 'epoch', epoch, 'model', model, 'state', state,
      'address', address, 'generation', generation, 'in_flight', in_flight,
      'last_used', last_used, 'free_memory', free_memory))
    FROM modeld_replicas WHERE {which}), '[]') AS replicas"""
_TOP = "(SELECT coalesce(max(version), 0) FROM modeld_hosts) AS top"
_PICKED = "$1::text[] IS NULL OR host_id = ANY($1)"
_READ = f"""
SELECT {_HOSTS_JSON.format(which=_PICKED)}, {_REPLICAS_JSON.format(which=_PICKED)}, {_TOP}
"""
# A resync between full reads: the hosts whose version moved past $1 (their rows and
# all their replicas, so that a deleted replica goes too), which hosts there are (their
# count and the sum of their epochs: epochs only grow, so a host gone, or gone and
# replaced, changes one or the other), and the leases running out within $2 seconds.
_CHANGED = "host_id IN (SELECT host_id FROM modeld_hosts WHERE version > $1)"
_SINCE = f"""
SELECT /*renewed*/ {_HOSTS_JSON.format(which=_CHANGED)},
  {_REPLICAS_JSON.format(which=_CHANGED)}, {_TOP},
  coalesce((SELECT json_agg(host_id) FROM modeld_hosts WHERE version > $1), '[]') AS changed,
  (SELECT count(*) FROM modeld_hosts) AS count,
  (SELECT coalesce(sum(epoch), 0) FROM modeld_hosts) AS epochs,
  coalesce((SELECT json_object_agg(host_id, extract(epoch FROM lease_expires_at - now()))
            FROM modeld_hosts WHERE lease_expires_at < now() + make_interval(secs => $2)),
           '{{}}') AS near
"""

# This session's liveness locks of earlier epochs go; the new epoch's is taken.
_UNLOCK_OLD = """
SELECT pg_advisory_unlock($1, objid::bigint::int) FROM pg_locks
WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND classid::bigint = $1
  AND objsubid = 2 AND objid::bigint <> $2
"""

# The death check: hosts whose liveness lock nobody holds, their leases ended (and
# each named on CHANNEL); `{on}` says when it runs, `{but}` which host it spares.
_DEAD = f"""dead AS (
    UPDATE modeld_hosts h SET lease_expires_at = least(h.lease_expires_at, now()), gone = true,
        version = nextval('modeld_version')
    WHERE {{on}} AND NOT h.gone AND h.host_id <> {{but}} AND NOT EXISTS (
        SELECT 1 FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.database = {THIS_DB} AND l.granted
          AND l.classid::bigint = {HOST_LOCK} AND l.objid::bigint = h.epoch % 2147483648
          AND l.objsubid = 2)
    RETURNING h.host_id, pg_notify('{CHANNEL}', h.host_id)
)"""
_MARK_DEAD = "WITH " + _DEAD.format(on="true", but="''") + " SELECT host_id FROM dead"

# The heartbeat ($3 host, $4 epoch, $5 ttl) and resync ($1, $2) in one statement, and
# with them, by ballot (election.py), the election's part: TRY, a follower's try ($6
# its session's name); HOLD, the leader's check and its death check ($6 whether it
# runs; never on the leader's own row, which this statement renews).
_HB = """hb AS (
    UPDATE modeld_hosts SET lease_expires_at = now() + make_interval(secs => $5),
        gone = false,
        version = CASE WHEN gone THEN nextval('modeld_version') ELSE version END
    WHERE host_id = $3 AND epoch = $4
    RETURNING 1
)"""
_RENEWED = "(SELECT count(*) FROM hb) > 0 AS renewed,"
_DEAD_LIST = "coalesce((SELECT json_agg(host_id) FROM dead), '[]') AS dead,"
_ROUNDS: dict[Ballot | None, str] = {
    None: f"WITH {_HB} {_SINCE.replace('/*renewed*/', _RENEWED)}",
    Ballot.TRY: f"WITH {_HB} "
    + _SINCE.replace("/*renewed*/", f"{_RENEWED} {TRY_COLUMNS},")
    + f"\n{TRY_FROM}\n",
    Ballot.HOLD: f"WITH {_HB}, {_DEAD.format(on='$6', but='$3')} "
    + _SINCE.replace("/*renewed*/", f"{_RENEWED} {_DEAD_LIST} {HOLD_COLUMNS},"),
}

# Fenced as replica rows are: only this host's live row of this epoch.
_FIGURES = """
UPDATE modeld_hosts SET backends = $3, gpu_free = $4, gpu_total = $5, ram_free = $6,
    ram_total = $7, loaded = $8, max_loaded = $9, evictable = $10,
    version = nextval('modeld_version')
WHERE host_id = $1 AND epoch = $2
RETURNING 1
"""


class Fenced(Exception):
    """This host's row has another epoch, or was reaped: writes under `epoch` no longer
    count."""

    def __init__(self, host_id: str, epoch: int) -> None:
        super().__init__(f"{host_id} epoch {epoch}")
        self.epoch = epoch


@dataclass(frozen=True)
class Snapshot:
    hosts: list[dict[str, Any]]
    replicas: list[dict[str, Any]]
    # The highest host version in the database when read.
    top: int = 0


@dataclass(frozen=True)
class Changes:
    """What `read_since` returns: the changed hosts' rows, which hosts there are, and
    the leases about to run out (host id -> seconds left)."""

    snapshot: Snapshot
    changed: list[str]
    count: int
    epochs: int
    near: dict[str, float]


@dataclass(frozen=True)
class Renewed:
    """What a heartbeat round read: the changes, the election's vote (None: it carried
    no ballot) and the hosts its death check found dead."""

    changes: Changes
    vote: Vote | None
    dead: list[str]


class Store:
    def __init__(self, link: Link, host_id: str, timeout: float) -> None:
        self._link = link
        self._host = host_id
        self._timeout = timeout

    async def register(
        self,
        address: str,
        role: str,
        labels: dict[str, str],
        ttl: float,
        rows: Sequence[PublishedRow],
        *,
        figures: HostFigures | None = None,
    ) -> int:
        """A new epoch for this host; its older rows are dropped, `rows` and its capacity
        announced (an earlier life's capacity never survives a new epoch)."""
        async with self._link.acquire() as conn, conn.transaction():
            epoch: int = await conn.fetchval(
                """
                INSERT INTO modeld_hosts (host_id, epoch, address, role, labels, lease_expires_at,
                                          version)
                VALUES ($1, nextval('modeld_epoch'), $2, $3, $4::jsonb,
                        now() + make_interval(secs => $5), nextval('modeld_version'))
                ON CONFLICT (host_id) DO UPDATE SET
                    epoch = EXCLUDED.epoch, address = EXCLUDED.address, role = EXCLUDED.role,
                    labels = EXCLUDED.labels, lease_expires_at = EXCLUDED.lease_expires_at,
                    registered_at = now(), gone = false, version = EXCLUDED.version
                RETURNING epoch
                """,
                self._host,
                address,
                role,
                json.dumps(labels),
                ttl,
                timeout=self._timeout,
            )
            # The liveness lock of this epoch, taken before the row is visible to anyone:
            # a row whose lock is free is a host whose connection is gone (`mark_dead`).
            key = host_key(epoch)
            await conn.execute(_UNLOCK_OLD, HOST_LOCK, key, timeout=self._timeout)
            await conn.execute("SELECT pg_try_advisory_lock($1, $2)", HOST_LOCK, key)
            await conn.execute(
                "DELETE FROM modeld_replicas WHERE host_id = $1 AND epoch <> $2",
                self._host,
                epoch,
                timeout=self._timeout,
            )
            await self._write_figures(conn, epoch, figures or HostFigures())
            await self._write_rows(conn, epoch, rows, ())
            return epoch

    async def heartbeat(self, epoch: int, ttl: float) -> None:
        """Renew this epoch's lease. An expired row that nobody reaped is still ours:
        after a database outage every lease has run out, and renewing it (rather than
        a new epoch) is what keeps the cluster from churning once the link is back."""
        renewed = await self._link.fetchval(
            """
            UPDATE modeld_hosts SET lease_expires_at = now() + make_interval(secs => $3),
                gone = false,
                version = CASE WHEN gone THEN nextval('modeld_version') ELSE version END
            WHERE host_id = $1 AND epoch = $2
            RETURNING 1
            """,
            self._host,
            epoch,
            ttl,
        )
        if renewed is None:
            raise Fenced(self._host, epoch)

    async def publish(self, epoch: int, rows: Sequence[PublishedRow], gone: Sequence[str]) -> None:
        async with self._link.acquire() as conn, conn.transaction():
            live = await conn.fetchval(
                """
                UPDATE modeld_hosts SET version = nextval('modeld_version')
                WHERE host_id = $1 AND epoch = $2 RETURNING 1
                """,
                self._host,
                epoch,
                timeout=self._timeout,
            )
            if live is None:
                raise Fenced(self._host, epoch)
            await self._write_rows(conn, epoch, rows, gone)

    async def publish_host(self, epoch: int, figures: HostFigures) -> None:
        """This host's capacity figures, in its own host row."""
        async with self._link.acquire() as conn, conn.transaction():
            await self._write_figures(conn, epoch, figures)
            await conn.execute(
                "SELECT pg_notify($1, $2)", CHANNEL, self._host, timeout=self._timeout
            )

    async def _write_figures(
        self, conn: asyncpg.Connection, epoch: int, figures: HostFigures
    ) -> None:
        written = await conn.fetchval(
            _FIGURES,
            self._host,
            epoch,
            list(figures.backends),
            list(figures.gpu_free),
            list(figures.gpu_total),
            figures.ram_free,
            figures.ram_total,
            figures.loaded,
            figures.max_loaded,
            figures.evictable,
            timeout=self._timeout,
        )
        if written is None:
            raise Fenced(self._host, epoch)

    async def _write_rows(
        self,
        conn: asyncpg.Connection,
        epoch: int,
        rows: Sequence[PublishedRow],
        gone: Sequence[str],
    ) -> None:
        if rows:
            await conn.executemany(
                _UPSERT, [(*row, self._host, epoch) for row in rows], timeout=self._timeout
            )
        if gone:
            await conn.execute(
                "DELETE FROM modeld_replicas WHERE host_id = $1 AND replica_id = ANY($2::text[])",
                self._host,
                list(gone),
                timeout=self._timeout,
            )
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, self._host, timeout=self._timeout)

    async def read(self, host_ids: Sequence[str] | None) -> Snapshot:
        """Hosts and replicas (all, or of `host_ids`) in one statement: one snapshot."""
        row = await self._link.fetchrow(_READ, list(host_ids) if host_ids is not None else None)
        assert row is not None
        return Snapshot(json.loads(row["hosts"]), json.loads(row["replicas"]), int(row["top"]))

    async def read_since(self, version: int, near: float) -> Changes:
        """Only what changed since `version`, plus the cheap liveness figures; one statement."""
        row = await self._link.fetchrow(_SINCE, version, near)
        return _changes(row)

    async def renew_and_read_since(
        self,
        epoch: int,
        ttl: float,
        version: int,
        near: float,
        ballot: Ballot | None = None,
        *,
        name: str = "",
        deaths: bool = False,
    ) -> Renewed:
        """`heartbeat` and `read_since` in one statement, with the election's `ballot`
        (TRY: the session's `name`) and, with HOLD, the death check when `deaths`: an
        idle host's one statement per host_ttl/3."""
        args: tuple[object, ...] = (version, near, self._host, epoch, ttl)
        if ballot is Ballot.TRY:
            args = (*args, name)
        elif ballot is Ballot.HOLD:
            args = (*args, deaths)
        row = await self._link.fetchrow(_ROUNDS[ballot], *args)
        if row is None or not row["renewed"]:
            raise Fenced(self._host, epoch)
        vote = None if ballot is None else Vote.of(ballot, row)
        dead = json.loads(row["dead"]) if ballot is Ballot.HOLD else []
        return Renewed(_changes(row), vote, dead)

    async def reap_one(self) -> str | None:
        """Delete the longest-expired host (its replicas go with it); one modeld at a time."""
        async with self._link.acquire() as conn, conn.transaction():
            if not await conn.fetchval(
                "SELECT pg_try_advisory_xact_lock($1)", REAP_LOCK, timeout=self._timeout
            ):
                return None
            host: str | None = await conn.fetchval(
                """
                DELETE FROM modeld_hosts WHERE host_id = (
                    SELECT host_id FROM modeld_hosts WHERE lease_expires_at < now()
                    ORDER BY lease_expires_at LIMIT 1)
                -- Checked again on the locked row: a heartbeat that just won stays.
                AND lease_expires_at < now()
                RETURNING host_id
                """,
                timeout=self._timeout,
            )
            if host is not None:
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, host, timeout=self._timeout)
            return host

    async def mark_dead(self) -> list[str]:
        """Hosts whose liveness lock nobody holds (their modeld's connection closed: it
        exited, or was killed) get their lease ended now, which frees their slots
        (claims.py) and takes them out of every view; one statement."""
        rows = await self._link.fetch(_MARK_DEAD)
        return [row["host_id"] for row in rows]

    async def leave(self, epoch: int) -> None:
        async with self._link.acquire() as conn, conn.transaction():
            await conn.execute(
                "DELETE FROM modeld_hosts WHERE host_id = $1 AND epoch = $2",
                self._host,
                epoch,
                timeout=self._timeout,
            )
            await conn.execute(
                "SELECT pg_notify($1, $2)", CHANNEL, self._host, timeout=self._timeout
            )


def _changes(row: asyncpg.Record | None) -> Changes:
    assert row is not None
    snap = Snapshot(json.loads(row["hosts"]), json.loads(row["replicas"]), int(row["top"]))
    near_left = {k: float(v) for k, v in json.loads(row["near"]).items()}
    return Changes(
        snap, json.loads(row["changed"]), int(row["count"]), int(row["epochs"]), near_left
    )
