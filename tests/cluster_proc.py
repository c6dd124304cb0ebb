"""Several real `modeld serve` daemons forming one cluster over one PostgreSQL.

    async with running_cluster(tmp_path, dsn, ["a", "b", "c"]) as hosts:
        await hosts["a"].stub.Route(...)

Each host has its own state dir, port and host_id; `host_ttl` is short so that
failure tests stay quick. Daemons start concurrently; each is SERVING and
registered (its `cluster_registered` log line) before the block runs.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import asyncpg

from daemon_proc import ECHO_CATALOG, DaemonProc, start_daemon, write_config

HOST_TTL = 2.0


def cluster_toml(dsn: str, host_id: str, ttl: float = HOST_TTL, extra: str = "") -> str:
    return (
        ECHO_CATALOG
        + f'\n[cluster]\ndsn = "{dsn}"\nhost_id = "{host_id}"\nhost_ttl = "{ttl}s"\n'
        + extra
    )


async def start_host(
    tmp_path: Path, dsn: str, host_id: str, ttl: float = HOST_TTL, extra: str = ""
) -> DaemonProc:
    folder = tmp_path / host_id
    folder.mkdir(exist_ok=True)
    config, addr = write_config(folder, cluster_toml(dsn, host_id, ttl, extra))
    daemon = await start_daemon(config, addr)
    try:
        await daemon.wait_log(lambda e: e.get("event") == "cluster_registered", 20.0)
    except BaseException:
        await daemon.close()
        raise
    return daemon


@contextlib.asynccontextmanager
async def running_cluster(
    tmp_path: Path,
    dsn: str | Sequence[str],
    host_ids: Sequence[str],
    ttl: float = HOST_TTL,
    extra: str = "",
) -> AsyncIterator[dict[str, DaemonProc]]:
    """`dsn` may be one per host (e.g. some through a fault proxy)."""
    dsns = [dsn] * len(host_ids) if isinstance(dsn, str) else list(dsn)
    started = await asyncio.gather(
        *(start_host(tmp_path, d, h, ttl, extra) for d, h in zip(dsns, host_ids, strict=True)),
        return_exceptions=True,
    )
    hosts = {h: d for h, d in zip(host_ids, started, strict=True) if isinstance(d, DaemonProc)}
    try:
        for result in started:
            if isinstance(result, BaseException):
                raise result
        yield hosts
    finally:
        await asyncio.gather(*(_stop(d) for d in hosts.values()))


async def _stop(daemon: DaemonProc) -> None:
    if daemon.proc.returncode is None:
        with contextlib.suppress(TimeoutError):
            await daemon.stop()
    await daemon.close()


async def db_rows(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows
    finally:
        await conn.close()
