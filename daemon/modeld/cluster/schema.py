"""The cluster's PostgreSQL schema, by numbered migrations (as the SQLite registry).

Tables (one writer per row: the host it names):
- modeld_hosts: one row per live host; `epoch` comes from a sequence, so a host
  that re-registers fences every write of its earlier self (writes check epoch).
  It also holds the host's published capacity (backends, memory, replicas).
- modeld_replicas: a host's replicas with their state, address, generation and
  published load; deleted with their host (reaping is `DELETE` of the host row).
- modeld_claims: who may start a replica of a model, one row per (model, slot) with
  slot < max_replicas (`claims.py`): an owner and an expiry by the database clock
  while loading, the replica it became once serving, the error and backoff end
  once failed. A claim is taken and fenced by its `claim_id`, never by a lock.
Writers NOTIFY `modeld_cluster` with their host id; receivers re-read that host.
- modeld_models: the cluster's model specs (PutModel/DeleteModel on any host), each
  with the version that last wrote it; modeld_models_version holds the version of
  the whole set, bumped in the same transaction as every change, so one read gives a
  consistent set and its version. Changes NOTIFY `modeld_models` (cluster/specs.py).
"""

import asyncpg

from modeld.errors import RegistryError

CHANNEL = "modeld_cluster"
# Serialises migrations of concurrently starting modelds; distinct from the reap lock.
MIGRATE_LOCK = 0x6D6F64656C64_01
REAP_LOCK = 0x6D6F64656C64_02
# Held for as long as a host is the leader, on its own connection (cluster/election.py).
LEADER_LOCK = 0x6D6F64656C64_03
SPECS_CHANNEL = "modeld_models"
# First key of each host's liveness lock, a session lock held on its one connection
# (link.py), the second being its epoch (`host_key`): PostgreSQL frees it the moment
# that connection closes, so a lock nobody holds is a host whose process is gone.
# Distinct from claims.CLAIM_LOCK, the other two-key advisory lock.
HOST_LOCK = 0x6D6F6468
# pg_locks shows every database's locks: only this database's are the cluster's.
THIS_DB = "(SELECT oid FROM pg_database WHERE datname = current_database())"


def host_key(epoch: int) -> int:
    """The liveness lock's second key (an int4) for `epoch`; pg_locks shows it as objid."""
    return epoch % 2147483648


MIGRATIONS: tuple[str, ...] = (
    """
    CREATE SEQUENCE modeld_epoch;
    CREATE TABLE modeld_hosts (
        host_id text PRIMARY KEY,
        epoch bigint NOT NULL,
        address text NOT NULL,
        role text NOT NULL,
        labels jsonb NOT NULL DEFAULT '{}',
        lease_expires_at timestamptz NOT NULL,
        registered_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE modeld_replicas (
        replica_id text PRIMARY KEY,
        host_id text NOT NULL REFERENCES modeld_hosts ON DELETE CASCADE,
        epoch bigint NOT NULL,
        model text NOT NULL,
        state text NOT NULL,
        address text NOT NULL,
        generation integer NOT NULL,
        in_flight integer NOT NULL DEFAULT 0,
        last_used double precision NOT NULL DEFAULT 0,
        free_memory bigint NOT NULL DEFAULT 0,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX modeld_replicas_host ON modeld_replicas (host_id);
    """,
    # Host capacity for placement (cluster/hostcap.py), written by the host itself.
    """
    ALTER TABLE modeld_hosts
        ADD COLUMN backends text[] NOT NULL DEFAULT '{}',
        ADD COLUMN gpu_free bigint[] NOT NULL DEFAULT '{}',
        ADD COLUMN gpu_total bigint[] NOT NULL DEFAULT '{}',
        ADD COLUMN ram_free bigint NOT NULL DEFAULT 0,
        ADD COLUMN ram_total bigint NOT NULL DEFAULT 0,
        ADD COLUMN loaded integer NOT NULL DEFAULT 0,
        ADD COLUMN max_loaded integer NOT NULL DEFAULT 0,
        ADD COLUMN evictable bigint NOT NULL DEFAULT 0;
    """,
    """
    CREATE TABLE modeld_models (
        name text PRIMARY KEY,
        spec jsonb NOT NULL,
        version bigint NOT NULL,
        updated_by text NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE modeld_models_version (version bigint NOT NULL);
    INSERT INTO modeld_models_version (version) VALUES (0);
    """,
    """
    CREATE SEQUENCE modeld_claim_id;
    CREATE TABLE modeld_claims (
        model text NOT NULL,
        slot integer NOT NULL,
        claim_id bigint NOT NULL,
        owner_host text NOT NULL,
        state text NOT NULL,
        expires_at timestamptz NOT NULL,
        replica_id text,
        failures integer NOT NULL DEFAULT 0,
        error text NOT NULL DEFAULT '',
        code text NOT NULL DEFAULT '',
        PRIMARY KEY (model, slot)
    );
    """,
    # Set by the death check (store.mark_dead) on a host whose session is gone, cleared
    # by its own heartbeat: evidence that outweighs this modeld's doubt after an outage.
    """
    ALTER TABLE modeld_hosts ADD COLUMN gone boolean NOT NULL DEFAULT false;
    """,
    # Incremental resyncs (store.read_since): every write that changes what others
    # see of a host (its row, its replicas; not a lease renewal) gives its host row
    # a new `version`, so a resync reads only the hosts changed since its last.
    """
    CREATE SEQUENCE modeld_version;
    ALTER TABLE modeld_hosts ADD COLUMN version bigint NOT NULL DEFAULT 0;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


async def migrate(conn: asyncpg.Connection) -> int:
    """Bring the schema to SCHEMA_VERSION; refuse a database a newer modeld migrated."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS modeld_schema (version integer NOT NULL)")
        version = await conn.fetchval("SELECT max(version) FROM modeld_schema") or 0
        if version > SCHEMA_VERSION:
            raise RegistryError(
                f"the cluster database has schema version {version}, newer than this modeld "
                f"knows ({SCHEMA_VERSION}); upgrade modeld on this host"
            )
        for number in range(version + 1, SCHEMA_VERSION + 1):
            await conn.execute(MIGRATIONS[number - 1])
            await conn.execute("INSERT INTO modeld_schema (version) VALUES ($1)", number)
        return SCHEMA_VERSION
