"""Several real `modeld serve` daemons forming one cluster over one PostgreSQL.

    async with running_cluster(tmp_path, dsn, ["a", "b", "c"]) as hosts:
        await hosts["a"].stub.Route(...)

Each host has its own state dir, port and host_id; `host_ttl` is short so that
failure tests stay quick. Daemons start concurrently; each is SERVING and
registered (its `cluster_registered` log line) before the block runs.

`start_host(..., netns=("modeld-x-0", "10.1.2.2"))` runs the daemon inside that
network namespace (`ip netns exec`, which execs: the process is the daemon),
listening on and advertising that address; its backends bind there too.

Helpers for the tests: log matchers (`event`, `sees_ready`, `after`: only lines
logged from now on), `load_on` (Load on a named host), `db_rows`/`until_db`.
"""

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from backend_proc import free_port
from daemon_proc import ECHO_CATALOG, DaemonProc, start_daemon, write_config
from modeld._proto.modeld.v1 import modeld_pb2 as pb

HOST_TTL = 2.0
# Several daemons start at once, on a CI machine that may be busy: generous.
START_S = 60.0


def cluster_toml(
    dsn: str, host_id: str, ttl: float = HOST_TTL, extra: str = "", catalog: str = ECHO_CATALOG
) -> str:
    return (
        catalog
        + f'\n[cluster]\ndsn = "{dsn}"\nhost_id = "{host_id}"\nhost_ttl = "{ttl}s"\n'
        + extra
    )


async def start_host(
    tmp_path: Path,
    dsn: str,
    host_id: str,
    *,
    ttl: float = HOST_TTL,
    extra: str = "",
    netns: tuple[str, str] | None = None,
    catalog: str = ECHO_CATALOG,
) -> DaemonProc:
    folder = tmp_path / host_id
    folder.mkdir(exist_ok=True)
    if netns is None:
        config, addr = write_config(folder, cluster_toml(dsn, host_id, ttl, extra, catalog))
        daemon = await start_daemon(config, addr, wait=False)
    else:
        text = cluster_toml(dsn, host_id, ttl, extra, catalog)
        daemon = await _start_in_netns(folder, text, *netns)
    try:
        await daemon.wait_serving(START_S)
        await daemon.wait_log(lambda e: e.get("event") == "cluster_registered", START_S)
    except BaseException:
        await daemon.close()
        raise
    return daemon


async def _start_in_netns(folder: Path, cluster: str, netns: str, address: str) -> DaemonProc:
    """`cluster`: the config after the top-level keys, its [cluster] table last."""
    # A fresh namespace has every port free; the daemon is alone on its address.
    addr = f"{address}:{free_port()}"
    (folder / "models").mkdir(exist_ok=True)
    config = folder / "modeld.toml"
    config.write_text(
        f'listen = ["{addr}"]\nstate_dir = "{folder / "state"}"\n'
        f'models_dir = "{folder / "models"}"\nlog_level = "debug"\nshutdown_grace = "5s"\n'
        # Between namespaces is not loopback: plaintext must be allowed explicitly.
        "allow_insecure_remote = true\n"
        + cluster
        + f'advertise = "{addr}"\nallow_insecure_remote = true\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELD_")}
    proc = await asyncio.create_subprocess_exec(
        *("ip", "netns", "exec", netns, sys.executable, "-m", "modeld.cli.main", "serve"),
        *("--config", str(config)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    return DaemonProc(proc, addr, config)


@contextlib.asynccontextmanager
async def running_cluster(
    tmp_path: Path,
    dsn: str | Sequence[str],
    host_ids: Sequence[str],
    *,
    ttl: float = HOST_TTL,
    extra: str | Mapping[str, str] = "",
    netns: Sequence[tuple[str, str]] | None = None,
    catalog: str = ECHO_CATALOG,
) -> AsyncIterator[dict[str, DaemonProc]]:
    """`dsn` may be one per host (e.g. some through a fault proxy); `extra` one per
    host id; `netns` one (namespace, address) per host."""
    dsns = [dsn] * len(host_ids) if isinstance(dsn, str) else list(dsn)
    extras = dict.fromkeys(host_ids, extra) if isinstance(extra, str) else extra
    spaces: Sequence[tuple[str, str] | None] = netns or [None] * len(host_ids)
    started = await asyncio.gather(
        *(
            start_host(tmp_path, d, h, ttl=ttl, extra=extras[h], netns=n, catalog=catalog)
            for d, h, n in zip(dsns, host_ids, spaces, strict=True)
        ),
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
        with contextlib.suppress(TimeoutError, ProcessLookupError):
            # A test may leave a host SIGSTOPped: it must be able to exit.
            daemon.proc.send_signal(signal.SIGCONT)
            await daemon.stop()
    await daemon.close()


async def db_rows(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows
    finally:
        await conn.close()


def after(daemon: DaemonProc, match: Callable[[dict[str, Any]], bool]) -> Callable[..., Any]:
    """A log matcher that only accepts lines logged from now on."""
    seen = {id(e) for e in daemon.log}
    return lambda e: id(e) not in seen and match(e)


def sees_ready(host: str, replica_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: (
        e.get("event") == "cluster_view_changed" and f"{host}/{replica_id}" in e.get("ready", [])
    )


def event(name: str, **fields: object) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("event") == name and all(e.get(k) == v for k, v in fields.items())


async def load_on(via: DaemonProc, host: str, model: str = "echo") -> pb.Replica:
    reply = await via.stub.Load(pb.LoadRequest(model=model, host=host), timeout=30)
    assert len(reply.replicas) == 1
    replica: pb.Replica = reply.replicas[0]
    return replica


async def load_seen(via: DaemonProc, host: str, limit_s: float = 20) -> pb.Replica:
    """`load_on`, then until `via`'s view shows the replica READY on `host`."""
    replica = await load_on(via, host)
    await via.wait_log(sees_ready(host, replica.id), limit_s)
    return replica


async def until_db(
    dsn: str, sql: str, ok: Callable[[list[Any]], bool], limit_s: float
) -> list[Any]:
    """Poll the database until `ok(rows)`; fail after `limit_s`."""
    loop = asyncio.get_running_loop()
    until = loop.time() + limit_s
    while True:
        rows = await db_rows(dsn, sql)
        if ok(rows):
            return rows
        assert loop.time() < until, rows
        await asyncio.sleep(0.1)
