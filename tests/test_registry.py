"""Registry: migrations, one serialized writer, refusal to touch what is not ours."""

import asyncio
import sqlite3
from pathlib import Path

import aiosqlite
import pytest

from modeld.errors import RegistryError, Unavailable
from modeld.ops.events import Event
from modeld.spec import ModelSpec
from modeld.state import ReplicaState
from modeld.storage.migrations import MIGRATIONS
from modeld.storage.registry import Registry, ReplicaRow


async def test_fresh_database_is_migrated_and_marked(tmp_path: Path) -> None:
    reg = await Registry.open(tmp_path / "m.db")
    await reg.close()
    db = sqlite3.connect(tmp_path / "m.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


async def test_models_survive_reopen(tmp_path: Path) -> None:
    reg = await Registry.open(tmp_path / "m.db")
    spec = ModelSpec(name="a", backend="echo", options=(("k", "v"),), groups=("g",), idle_ttl=0.0)
    await reg.put_model(spec.with_source("api"))
    await reg.close()
    reg = await Registry.open(tmp_path / "m.db")
    assert await reg.list_models() == [spec.with_source("api")]
    assert await reg.integrity_check() == "ok"
    await reg.close()


async def test_concurrent_writes_are_all_applied(tmp_path: Path) -> None:
    reg = await Registry.open(tmp_path / "m.db")
    await asyncio.gather(
        *(reg.put_model(ModelSpec(name=f"m{i}", backend="echo")) for i in range(200))
    )
    assert len(await reg.list_models()) == 200
    await reg.close()


async def test_replica_rows_and_events(tmp_path: Path) -> None:
    reg = await Registry.open(tmp_path / "m.db")
    await reg.insert_replica(
        ReplicaRow(id="r1", model="a", backend="echo", state="STARTING", pid=12)
    )
    await reg.update_replica("r1", state="READY", address="127.0.0.1:1")
    assert [r.id for r in await reg.live_replicas()] == ["r1"]
    await reg.update_replica("r1", state="STOPPED")
    assert await reg.live_replicas() == []
    await reg.add_event(Event(1.0, "r1", "a", ReplicaState.READY, ReplicaState.STOPPED, "unload"))
    rows = await reg.query("SELECT to_state, reason FROM events")
    assert [tuple(r) for r in rows] == [("STOPPED", "unload")]
    with pytest.raises(ValueError, match="not replica columns"):
        await reg.update_replica("r1", bogus=1)
    await reg.close()


async def test_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    await (await Registry.open(path)).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(RegistryError, match="newer than this modeld"):
        await Registry.open(path)
    assert path.read_bytes() == before


async def test_foreign_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE customers (id INTEGER)")
    db.commit()
    db.close()
    with pytest.raises(RegistryError, match="another program"):
        await Registry.open(path)


async def test_non_database_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(RegistryError, match="not a SQLite database"):
        await Registry.open(path)
    assert path.read_bytes() == b"definitely not sqlite" * 100


async def test_a_write_past_the_queue_bound_fails_fast_naming_the_limit(tmp_path: Path) -> None:
    """Issue 10 defect 11: the writer's queue was unbounded, so a stalled disk let
    writes (and their callers) pile up without limit."""
    reg = await Registry.open(tmp_path / "m.db", max_queued_writes=2)
    held = asyncio.Event()
    writing = asyncio.Event()

    async def stall(db: object) -> None:
        writing.set()
        await held.wait()

    async def insert(db: aiosqlite.Connection) -> None:
        await db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES ('k', '1')")

    first = reg.write(stall)
    await writing.wait()
    queued = [reg.write(insert), reg.write(stall)]
    with pytest.raises(Unavailable, match=r"2 writes are queued.*max_queued_writes"):
        reg.write(insert)
    held.set()
    await asyncio.gather(first, *queued)
    assert [tuple(r) for r in await reg.query("SELECT key, value FROM settings")] == [("k", "1")]
    await reg.write(insert)
    await reg.close()
