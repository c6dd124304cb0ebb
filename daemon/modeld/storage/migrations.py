"""Numbered schema migrations; the database's `PRAGMA user_version` is how many ran.

Append new migrations; never edit one that has shipped.
"""

# "modl" in ASCII: marks the file as ours so a foreign database is never touched.
APPLICATION_ID = 0x6D6F646C

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE models (
            name TEXT PRIMARY KEY,
            backend TEXT NOT NULL,
            model_file TEXT NOT NULL DEFAULT '',
            options TEXT NOT NULL DEFAULT '{}',
            min_replicas INTEGER NOT NULL DEFAULT 0,
            max_replicas INTEGER NOT NULL DEFAULT 1,
            pinned INTEGER NOT NULL DEFAULT 0,
            groups TEXT NOT NULL DEFAULT '[]',
            idle_ttl REAL,
            lease_ttl REAL,
            busy_timeout REAL,
            memory_estimate INTEGER NOT NULL DEFAULT 0,
            gpus INTEGER,
            gpu_ids TEXT NOT NULL DEFAULT '[]',
            source TEXT NOT NULL DEFAULT 'api'
        )""",
        """CREATE TABLE replicas (
            id TEXT PRIMARY KEY,
            node_id TEXT NOT NULL DEFAULT 'local',
            model TEXT NOT NULL,
            backend TEXT NOT NULL,
            state TEXT NOT NULL,
            address TEXT NOT NULL DEFAULT '',
            pid INTEGER,
            pgid INTEGER,
            proc_start INTEGER,
            gpu TEXT NOT NULL DEFAULT '',
            started_at REAL,
            ready_at REAL,
            stopped_at REAL,
            last_error TEXT NOT NULL DEFAULT '',
            restarts INTEGER NOT NULL DEFAULT 0,
            in_flight INTEGER NOT NULL DEFAULT 0,
            last_used REAL NOT NULL DEFAULT 0,
            free_memory INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX replicas_live ON replicas (node_id, model, state)",
        """CREATE TABLE settings (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )""",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            time REAL NOT NULL,
            replica_id TEXT NOT NULL,
            model TEXT NOT NULL,
            from_state TEXT,
            to_state TEXT NOT NULL,
            reason TEXT NOT NULL DEFAULT ''
        )""",
    ),
    # A model spec's cluster placement (spec.ModelSpec.host_labels, .placement).
    (
        "ALTER TABLE models ADD COLUMN host_labels TEXT NOT NULL DEFAULT '{}'",
        "ALTER TABLE models ADD COLUMN placement TEXT NOT NULL DEFAULT ''",
    ),
    # Lease slots per replica and the queue bound (spec.ModelSpec.parallel, .queue_max).
    (
        "ALTER TABLE models ADD COLUMN parallel INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE models ADD COLUMN queue_max INTEGER NOT NULL DEFAULT 512",
    ),
)
