"""PostgreSQL for the cluster tests: a fresh database per test, dropped afterwards.

The server: `MODELD_TEST_PG_DSN` when set (CI points it at a running server), else
a throwaway one started from the PostgreSQL binaries on the machine (initdb and
pg_ctl on PATH or in the usual Debian place), else the test is skipped with one
line — unless `MODELD_REQUIRE_POSTGRES=1`, where that is a failure.

    async def test_x(pg_dsn: str) -> None: ...   (import the fixture: `from pg import pg_dsn`)
"""

import atexit
import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from backend_proc import free_port

_server: str | None = None
_why_none = ""


def _binaries() -> tuple[str, str] | None:
    debian = sorted((str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")), reverse=True)
    for folder in [None, *debian]:
        initdb = shutil.which("initdb", path=folder)
        pg_ctl = shutil.which("pg_ctl", path=folder)
        if initdb and pg_ctl:
            return initdb, pg_ctl
    return None


def _as_postgres(argv: list[str]) -> list[str]:
    # initdb refuses to run as root; the packaged `postgres` user can.
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _throwaway() -> str | None:
    global _why_none
    found = _binaries()
    if found is None:
        _why_none = "no MODELD_TEST_PG_DSN and no initdb/pg_ctl on this machine"
        return None
    initdb, pg_ctl = found
    root = tempfile.mkdtemp(prefix="modeld-pg-")
    data = str(Path(root) / "data")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    port = free_port()
    try:
        subprocess.run(
            _as_postgres([initdb, "-D", data, "-U", "root", "--auth=trust", "-E", "UTF8"]),
            check=True,
            capture_output=True,
        )
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            _as_postgres([pg_ctl, "-D", data, "-o", options, "-w", "-l", f"{root}/log", "start"]),
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        _why_none = f"could not start a throwaway PostgreSQL: {exc}"
        return None

    def stop() -> None:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            subprocess.run(
                _as_postgres([pg_ctl, "-D", data, "-m", "immediate", "stop"]),
                check=True,
                capture_output=True,
            )
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(stop)
    return f"postgresql://root@127.0.0.1:{port}/postgres"


def server_dsn() -> str:
    """The server's DSN, or skip (fail under MODELD_REQUIRE_POSTGRES=1)."""
    global _server
    if _server is None:
        _server = os.environ.get("MODELD_TEST_PG_DSN") or _throwaway()
    if _server is None:
        message = f"PostgreSQL unavailable: {_why_none}; cluster tests skipped"
        if os.environ.get("MODELD_REQUIRE_POSTGRES") == "1":
            pytest.fail(message + " (MODELD_REQUIRE_POSTGRES=1)")
        pytest.skip(message)
    return _server


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture
async def pg_dsn() -> AsyncIterator[str]:
    async with fresh_database() as dsn:
        yield dsn


@contextlib.asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """A database of its own on the test server, dropped afterwards."""
    server = server_dsn()
    name = f"modeld_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield with_database(server, name)
    finally:
        conn = await asyncpg.connect(server)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
