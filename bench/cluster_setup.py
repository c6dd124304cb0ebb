"""What the cluster benchmarks (cluster_bench, scale_bench) share: PostgreSQL, configs, results.

Each run gets a fresh database (`fresh_database`) on the server named by
MODELD_TEST_PG_DSN, else `DEFAULT_DSN`; each daemon a folder and a config of its
own (`host_config`); the figures go to bench/results (`write_results`). Importing
this module puts tests/ on the path: the benchmarks start daemons with its helpers.
"""

import asyncio
import contextlib
import json
import os
import sys
import tomllib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from backend_proc import free_port  # noqa: E402
from daemon_proc import ECHO_CATALOG  # noqa: E402

DEFAULT_DSN = "postgresql://root@127.0.0.1:5432/postgres"
# Every port handed out in this run: a port free a moment ago may be handed out again
# before its daemon binds it (a hundred daemons take a minute to start).
_HANDED_OUT: set[int] = set()


def unused_port() -> int:
    """A free port no other daemon of this run was given."""
    while (port := free_port()) in _HANDED_OUT:
        pass
    _HANDED_OUT.add(port)
    return port


def server_dsn() -> str:
    return os.environ.get("MODELD_TEST_PG_DSN") or DEFAULT_DSN


def database_dsn(server: str, name: str) -> str:
    """The DSN of database `name` on `server`."""
    return urlunsplit(urlsplit(server)._replace(path=f"/{name}"))


@contextlib.asynccontextmanager
async def fresh_database(server: str, prefix: str) -> AsyncIterator[tuple[str, str]]:
    """A new database on `server` for the block, as (name, dsn); dropped after it."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(server)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    try:
        yield name, database_dsn(server, name)
    finally:
        conn = await asyncpg.connect(server)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


def host_config(
    folder: Path, dsn: str, host: str, ttl: float, models: str = "", *, metrics: bool = False
) -> tuple[Path, str]:
    """Write `folder`/modeld.toml for cluster host `host` (the echo catalog, then
    `models`; `metrics`: a metrics listener, see `metrics_address`); returns its path
    and the daemon's address."""
    addr = f"127.0.0.1:{unused_port()}"
    (folder / "models").mkdir(parents=True, exist_ok=True)
    listen = f'metrics_listen = "127.0.0.1:{unused_port()}"\n' if metrics else ""
    text = (
        listen + f'listen = ["{addr}"]\nstate_dir = "{folder / "state"}"\n'
        f'models_dir = "{folder / "models"}"\nlog_level = "info"\n'
        + ECHO_CATALOG
        + models
        + f'\n[cluster]\ndsn = "{dsn}"\nhost_id = "{host}"\nhost_ttl = "{ttl}s"\n'
    )
    path = folder / "modeld.toml"
    path.write_text(text)
    return path, addr


async def xact(server: str, name: str, *, rollbacks: bool = False) -> int:
    """`pg_stat_database.xact_commit` of database `name` (`rollbacks`: + xact_rollback),
    read afresh."""
    column = "xact_commit + xact_rollback" if rollbacks else "xact_commit"
    conn = await asyncpg.connect(server)
    try:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        value = await conn.fetchval(
            f"SELECT {column} FROM pg_stat_database WHERE datname = $1", name
        )
        return int(value)
    finally:
        await conn.close()


def metrics_address(config: Path) -> tuple[str, int]:
    """Where the daemon of `config` (written with `metrics=True`) serves /metrics."""
    listen = tomllib.loads(config.read_text())["metrics_listen"]
    host, _, port = listen.rpartition(":")
    return host, int(port)


async def scrape(config: Path, names: tuple[str, ...]) -> dict[str, float]:
    """The samples `names` (without labels) of that daemon's /metrics: no database
    connection needed."""
    host, port = metrics_address(config)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
        body = (await asyncio.wait_for(reader.read(), 10)).decode()
    finally:
        writer.close()
    samples: dict[str, float] = {}
    for line in body.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            samples[name] = float(value)
    return samples


def write_results(file_name: str, figures: Any) -> str:
    """Write the figures to bench/results/`file_name`; returns the JSON text."""
    text = json.dumps(figures, indent=2)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / file_name).write_text(text + "\n")
    return text
