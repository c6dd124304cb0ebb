"""The registry: the only code that touches SQLite.

One writer: every write is a job handed to a single writer task, which runs it as
one `BEGIN IMMEDIATE` transaction on the write connection, so writes are
serialized without any lock held by callers. Reads use a second connection
(WAL lets them run beside the writer). At most `max_queued_writes` jobs wait for
the writer: past that (a disk that stopped keeping up) a write fails at once
with Unavailable instead of queueing its caller without limit.
"""

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import structlog

from modeld.errors import RegistryError, Unavailable
from modeld.ops.events import Event
from modeld.spec import ModelSpec
from modeld.state import TERMINAL
from modeld.storage.migrations import APPLICATION_ID, MIGRATIONS

T = TypeVar("T")
log = structlog.get_logger(__name__)
EVENTS_KEPT = 10_000
# Far above what the daemon queues in normal work (a start writes a handful of rows);
# reached only when the disk stalls while requests keep coming.
MAX_QUEUED_WRITES = 1000
_SQLITE_MAGIC = b"SQLite format 3\x00"
_TERMINAL_VALUES = tuple(s.value for s in TERMINAL)
_MOVE_ASIDE = (
    "refusing to touch it: move it aside (modeld then starts with an empty registry) "
    "or restore a copy"
)


@dataclass
class ReplicaRow:
    id: str
    model: str
    backend: str
    state: str
    address: str = ""
    pid: int | None = None
    pgid: int | None = None
    proc_start: int | None = None
    gpu: str = ""
    started_at: float | None = None
    ready_at: float | None = None
    stopped_at: float | None = None
    last_error: str = ""
    restarts: int = 0
    node_id: str = "local"


REPLICA_COLUMNS = tuple(f.name for f in fields(ReplicaRow))
_MODEL_COLUMNS = tuple(f.name for f in fields(ModelSpec))
_JSON_MODEL_COLUMNS = frozenset({"options", "groups", "gpu_ids", "host_labels"})

Job = Callable[[aiosqlite.Connection], Awaitable[Any]]


class Registry:
    def __init__(
        self,
        path: Path,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        observe: Callable[[float], None] | None = None,
        max_queued_writes: int = MAX_QUEUED_WRITES,
    ) -> None:
        self.path = path
        self._observe = observe
        self._writer = writer
        self._reader = reader
        self._max_queued = max_queued_writes
        self._jobs: asyncio.Queue[tuple[Job, asyncio.Future[Any]] | None] = asyncio.Queue(
            max_queued_writes
        )
        self._task = asyncio.create_task(self._run_writer(), name="registry-writer")

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        synchronous: str = "NORMAL",
        observe: Callable[[float], None] | None = None,
        max_queued_writes: int = MAX_QUEUED_WRITES,
    ) -> "Registry":
        """Open (creating and migrating) the database; `observe` gets each write's seconds."""
        _refuse_non_sqlite(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"cannot create the state directory {path.parent}: {exc}") from None
        writer = await _connect(path)
        try:
            # Nothing may be written (not even the switch to WAL) before the file is
            # known to be ours and sound: a refused file stays byte for byte as it was.
            await _check_identity(writer, path)
            await _configure(writer, path, synchronous)
            await _migrate(writer, path)
            reader = await _connect(path, synchronous)
        except BaseException:
            await writer.close()
            raise
        return cls(path, writer, reader, observe, max_queued_writes)

    async def close(self) -> None:
        await self._jobs.put(None)
        await self._task
        await self._reader.close()
        await self._writer.close()

    async def _run_writer(self) -> None:
        while (item := await self._jobs.get()) is not None:
            job, fut = item
            if fut.cancelled():
                continue
            started = time.perf_counter()
            try:
                await self._writer.execute("BEGIN IMMEDIATE")
                result = await job(self._writer)
                await self._writer.commit()
                if self._observe is not None:
                    self._observe(time.perf_counter() - started)
            except sqlite3.Error as exc:
                await self._rollback()
                log.error("registry_write_failed", path=str(self.path), error=str(exc))
                _settle(fut, exc=write_failed(self.path, exc))
            except Exception as exc:
                await self._rollback()
                _settle(fut, exc=exc)
            else:
                _settle(fut, result=result)

    async def _rollback(self) -> None:
        # A rollback that fails too (the disk is gone) must not leave the connection
        # inside a transaction, or every later BEGIN would fail after the disk is back.
        with contextlib.suppress(sqlite3.Error):
            await self._writer.rollback()
        if self._writer.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                await self._writer.execute("ROLLBACK")

    def write(self, job: Callable[[aiosqlite.Connection], Awaitable[T]]) -> "asyncio.Future[T]":
        """Queue `job` to run as one serialized transaction; await the result.

        Raises Unavailable at once when `max_queued_writes` jobs are already waiting.
        """
        if self._jobs.full():
            raise Unavailable(
                f"{self._max_queued} writes are queued for the registry at {self.path}, "
                "its limit (max_queued_writes): the disk is not keeping up; retry later"
            )
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put_nowait((job, fut))
        return fut

    async def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        try:
            async with self._reader.execute(sql, params) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as exc:
            raise Unavailable(f"registry read failed ({self.path}): {exc}") from exc

    # models

    async def put_model(self, spec: ModelSpec) -> None:
        row = spec.to_dict()
        values = [
            json.dumps(row[c]) if c in _JSON_MODEL_COLUMNS else row[c] for c in _MODEL_COLUMNS
        ]
        sql = (
            f"INSERT OR REPLACE INTO models ({', '.join(_MODEL_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(_MODEL_COLUMNS))})"
        )

        async def job(db: aiosqlite.Connection) -> None:
            await db.execute(sql, values)

        await self.write(job)

    async def delete_model(self, name: str) -> bool:
        async def job(db: aiosqlite.Connection) -> bool:
            cur = await db.execute("DELETE FROM models WHERE name = ?", (name,))
            return cur.rowcount > 0

        return await self.write(job)

    async def list_models(self) -> list[ModelSpec]:
        rows = await self._read(f"SELECT {', '.join(_MODEL_COLUMNS)} FROM models ORDER BY name")
        specs = []
        for row in rows:
            data = {
                c: json.loads(row[c]) if c in _JSON_MODEL_COLUMNS else row[c]
                for c in _MODEL_COLUMNS
            }
            data["pinned"] = bool(data["pinned"])
            specs.append(ModelSpec.from_dict(data))
        return specs

    # settings

    async def get_settings(self) -> dict[str, Any]:
        rows = await self._read("SELECT key, value FROM settings")
        return {row["key"]: json.loads(row["value"]) for row in rows}

    async def put_settings(self, values: dict[str, Any]) -> None:
        async def job(db: aiosqlite.Connection) -> None:
            await db.executemany(
                "INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)",
                [(k, json.dumps(v)) for k, v in values.items()],
            )

        await self.write(job)

    # replicas

    async def insert_replica(self, row: ReplicaRow) -> None:
        values = [getattr(row, c) for c in REPLICA_COLUMNS]
        sql = (
            f"INSERT INTO replicas ({', '.join(REPLICA_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(REPLICA_COLUMNS))})"
        )

        async def job(db: aiosqlite.Connection) -> None:
            await db.execute(sql, values)

        await self.write(job)

    async def update_replica(self, replica_id: str, **changes: object) -> None:
        unknown = set(changes) - set(REPLICA_COLUMNS)
        if unknown or "id" in changes:
            raise ValueError(f"not replica columns: {sorted(unknown | ({'id'} & set(changes)))}")
        if not changes:
            return
        assignments = ", ".join(f"{c} = ?" for c in changes)
        params = (*changes.values(), replica_id)

        async def job(db: aiosqlite.Connection) -> None:
            await db.execute(f"UPDATE replicas SET {assignments} WHERE id = ?", params)

        await self.write(job)

    async def live_replicas(self, node_id: str = "local") -> list[ReplicaRow]:
        marks = ", ".join("?" * len(_TERMINAL_VALUES))
        rows = await self._read(
            f"SELECT {', '.join(REPLICA_COLUMNS)} FROM replicas "
            f"WHERE node_id = ? AND state NOT IN ({marks}) ORDER BY started_at",
            (node_id, *_TERMINAL_VALUES),
        )
        return [ReplicaRow(**dict(row)) for row in rows]

    async def get_replica(self, replica_id: str) -> ReplicaRow | None:
        rows = await self._read(
            f"SELECT {', '.join(REPLICA_COLUMNS)} FROM replicas WHERE id = ?", (replica_id,)
        )
        return ReplicaRow(**dict(rows[0])) if rows else None

    async def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Read-only SQL for inspection tools and tests."""
        return await self._read(sql, params)

    # events

    async def add_event(self, event: Event) -> None:
        params = (
            event.time,
            event.replica_id,
            event.model,
            event.from_state.value if event.from_state else None,
            event.to_state.value,
            event.reason,
        )

        async def job(db: aiosqlite.Connection) -> None:
            cur = await db.execute(
                "INSERT INTO events (time, replica_id, model, from_state, to_state, reason) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                params,
            )
            if cur.lastrowid is not None and cur.lastrowid % 100 == 0:
                await db.execute("DELETE FROM events WHERE id <= ?", (cur.lastrowid - EVENTS_KEPT,))

        await self.write(job)

    async def integrity_check(self) -> str:
        rows = await self._read("PRAGMA integrity_check")
        return "; ".join(str(row[0]) for row in rows)


def _settle(
    fut: asyncio.Future[Any], *, result: Any = None, exc: BaseException | None = None
) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _refuse_non_sqlite(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb") as fh:
        header = fh.read(len(_SQLITE_MAGIC))
    if header != _SQLITE_MAGIC:
        raise RegistryError(f"{path} is not a SQLite database; refusing to touch it")


def write_failed(path: Path, exc: sqlite3.Error) -> Unavailable:
    """The client's view of a failed write: nothing was saved, and why."""
    return Unavailable(
        f"the registry could not save the change, so nothing was changed: writing {path} "
        f"failed ({exc}); check that its disk is not full or read-only, then retry"
    )


async def _connect(path: Path, synchronous: str | None = None) -> aiosqlite.Connection:
    """A connection; configured for use (WAL) only when `synchronous` is given."""
    try:
        db = await aiosqlite.connect(path, isolation_level=None)
    except sqlite3.Error as exc:
        raise RegistryError(f"{path} cannot be opened: {exc}") from exc
    db.row_factory = sqlite3.Row
    if synchronous is not None:
        try:
            await _configure(db, path, synchronous)
        except BaseException:
            await db.close()
            raise
    return db


async def _configure(db: aiosqlite.Connection, path: Path, synchronous: str) -> None:
    try:
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute(f"PRAGMA synchronous = {synchronous}")
        await db.execute("PRAGMA foreign_keys = ON")
        await db.execute("PRAGMA busy_timeout = 5000")
    except sqlite3.Error as exc:
        raise RegistryError(f"{path} cannot be opened as a database: {exc}") from exc


async def _check_identity(db: aiosqlite.Connection, path: Path) -> None:
    """Refuse, by reading only, a file of another program, a newer schema or a damaged one."""
    try:
        version = await _pragma_int(db, "user_version")
        app_id = await _pragma_int(db, "application_id")
        async with db.execute("SELECT count(*) FROM sqlite_master") as cur:
            row = await cur.fetchone()
        objects = int(row[0]) if row else 0
        problems = [] if not objects else await _quick_check(db)
    except sqlite3.DatabaseError as exc:
        raise RegistryError(f"{path} is damaged ({exc}); {_MOVE_ASIDE}") from exc
    if objects and app_id != APPLICATION_ID:
        raise RegistryError(f"{path} is a database of another program; refusing to touch it")
    if version > len(MIGRATIONS):
        raise RegistryError(
            f"{path} has schema version {version}, newer than this modeld knows "
            f"({len(MIGRATIONS)}); upgrade modeld or point state_dir elsewhere"
        )
    if problems:
        raise RegistryError(f"{path} is damaged ({'; '.join(problems[:3])}); {_MOVE_ASIDE}")


async def _quick_check(db: aiosqlite.Connection) -> list[str]:
    async with db.execute("PRAGMA quick_check") as cur:
        rows = await cur.fetchall()
    return [str(r[0]) for r in rows if str(r[0]) != "ok"]


async def _migrate(db: aiosqlite.Connection, path: Path) -> None:
    try:
        version = await _pragma_int(db, "user_version")
    except sqlite3.DatabaseError as exc:
        raise RegistryError(f"{path} is not a usable database: {exc}") from exc
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        await db.execute("BEGIN IMMEDIATE")
        try:
            for statement in script:
                await db.execute(statement)
            await db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            await db.execute(f"PRAGMA user_version = {number}")
            await db.commit()
        except sqlite3.Error:
            await db.rollback()
            raise


async def _pragma_int(db: aiosqlite.Connection, name: str) -> int:
    async with db.execute(f"PRAGMA {name}") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0
