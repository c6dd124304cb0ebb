"""The cluster scale benchmark (`make bench-scale`): a measurement, not a test.

For each N (`--hosts 10,30`), N real `modeld serve` daemons (the echo catalog,
host_ttl `--host-ttl`) on a fresh database of one PostgreSQL (MODELD_TEST_PG_DSN,
else postgresql://root@127.0.0.1:5432/postgres, its default settings), and:

- connections: pg_stat_activity rows of that database, per host (application_name);
- idle tx/s: pg_stat_database.xact_commit + xact_rollback over `--idle` seconds with
  no requests, once start-up is over (a host_ttl with no notification heard, at
  most `--settle` seconds after the views converged; this script's own reads
  subtracted), per host;
- the same two as every daemon counts them itself (modeld_cluster_db_transactions_total
  and modeld_cluster_db_connections on its /metrics; no database connection needed):
  the cross-check where this script can connect, the only figures where it cannot
  (N hosts at one connection each fill max_connections = 100 at N = 100; then a host
  is stopped to free a slot for the joining one, and the result says which);
- view convergence: from every daemon registered (all N started) until every host
  lists all N alive; a joining host: from its registration (its log) until all N list it;
- kill -9 of that host (not the leader): until every other host lists it expired
  or gone; SIGSTOP of another: until all list it not alive (host_ttl bounds it);
- cross-host first Route: Load echo on one host, then at once a Route on another
  (its first try must succeed; forwarded to the owner);
- CPU (% of one core over the idle window) and RSS per daemon (/proc), and the
  machine's load average (it is shared: the figures depend on it).

Prints the figures and writes bench/results/scale_bench.json.
"""

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import uvloop

from cluster_setup import fresh_database, host_config, scrape, server_dsn, write_results, xact
from daemon_proc import DaemonProc, start_daemon
from modeld._proto.modeld.v1 import modeld_pb2 as pb

# Every daemon is asked at once each poll: 30 daemons at 0.2 s are 150 RPC/s already.
POLL_S = 0.2
TICKS = os.sysconf("SC_CLK_TCK")
# What each daemon counts of its own link (cluster/link.py), on its /metrics.
TX = "modeld_cluster_db_transactions_total"
CONNS = "modeld_cluster_db_connections"
HEARD = "modeld_cluster_db_notifications_total"


async def start(root: Path, dsn: str, host: str, ttl: float) -> DaemonProc:
    path, addr = host_config(root / host, dsn, host, ttl, metrics=True)
    daemon = await start_daemon(path, addr, wait=False)
    await daemon.wait_serving(120)
    await daemon.wait_log(lambda e: e.get("event") == "cluster_registered", 120)
    return daemon


def logged_at(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()


async def listed(d: DaemonProc) -> dict[str, int]:
    try:
        reply = await d.stub.ListHosts(pb.ListHostsRequest(), timeout=5)
    except grpc.aio.AioRpcError:
        return {}
    return {h.host_id: h.state for h in reply.hosts}


async def until_all(daemons: list[DaemonProc], ok: Any, limit_s: float) -> float | None:
    """Seconds (wall) until `ok(listing)` holds on every daemon, None past `limit_s`."""
    began = time.time()
    pending = list(daemons)
    while pending:
        views = await asyncio.gather(*(listed(d) for d in pending))
        pending = [d for d, v in zip(pending, views, strict=True) if not ok(v)]
        if time.time() - began > limit_s:
            return None
        await asyncio.sleep(POLL_S)
    return time.time()


async def connect_or_none(dsn: str) -> asyncpg.Connection | None:
    """A connection of this script's; None when the database has no slot left for it."""
    try:
        return await asyncpg.connect(dsn)
    except asyncpg.TooManyConnectionsError:
        return None


async def connections(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE 'modeld%'"
    )
    per: dict[str, int] = {}
    for row in rows:
        host = row["application_name"].rsplit("/", 1)[-1]
        per[host] = per.get(host, 0) + 1
    return per


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one_size(args: argparse.Namespace, server: str, n: int, root: Path) -> dict[str, Any]:
    async with fresh_database(server, "modeld_scale") as (name, dsn):
        daemons: list[DaemonProc] = []
        out: dict[str, Any] = {"hosts": n, "host_ttl_s": args.host_ttl}
        try:
            ids = [f"h{i:03d}" for i in range(n)]
            started = await asyncio.gather(
                *(start(root, dsn, h, args.host_ttl) for h in ids), return_exceptions=True
            )
            daemons = [d for d in started if isinstance(d, DaemonProc)]
            failed = [r for r in started if not isinstance(r, DaemonProc)]
            out["failed_to_start"] = len(failed)
            if failed:
                raise RuntimeError(f"{len(failed)} daemons did not start: {failed[0]!r}")
            # From the moment every daemon has registered (this script's clock).
            last = time.time()
            done = await until_all(
                daemons, lambda v: sum(s == pb.HOST_ALIVE for s in v.values()) >= n, 60
            )
            out["view_converged_s"] = None if done is None else round(done - last, 3)

            out.update(await measure_idle(args, server, name, dsn, daemons))
            out.update(await free_a_slot(dsn, daemons, ids))
            out.update(await measure_join_and_kill(args, root, dsn, daemons))
            out.update(await measure_route(daemons, ids))
            out.update(await measure_sigstop(daemons, ids))
            out["flaps"] = sum(
                1 for d in daemons for e in d.log if e.get("event") == "cluster_db_down"
            )
            out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        finally:
            await asyncio.gather(*(stop(d) for d in daemons))
        return out


async def free_a_slot(dsn: str, daemons: list[DaemonProc], ids: list[str]) -> dict[str, Any]:
    """When the database has no connection left for a joining host, one host leaves
    first (removed from `daemons` and `ids`; the others see it go)."""
    probe = await connect_or_none(dsn)
    if probe is not None:
        await probe.close()
        return {}
    left = ids.pop(3)
    await stop(daemons.pop(3))
    return {"join_after_stopping": left}


async def own_counts(daemons: list[DaemonProc]) -> list[tuple[float, dict[str, float]]]:
    """(when, samples) of every daemon's own counters, read over HTTP at once."""

    async def one(d: DaemonProc) -> tuple[float, dict[str, float]]:
        samples = await scrape(d.config, (TX, CONNS, HEARD))
        return time.monotonic(), samples

    return await asyncio.gather(*(one(d) for d in daemons))


def process_figures(cpu: list[float], pids: list[int]) -> dict[str, float]:
    return {
        "cpu_percent_per_daemon_median": round(statistics.median(cpu), 2),
        "cpu_percent_per_daemon_max": round(max(cpu), 2),
        "rss_mib_per_daemon_median": round(statistics.median(rss_mib(p) for p in pids), 1),
    }


async def settle(daemons: list[DaemonProc], quiet_s: float, limit_s: float) -> float | None:
    """Seconds until start-up is over: every host registered, every view read in full
    and no daemon heard a notification for `quiet_s` (capacity published: on one
    machine every daemon reads the same RAM, and a hundred starting daemons move it
    past the hysteresis of all). None: not within `limit_s`; idle is measured then."""
    began = time.monotonic()
    heard = [s[HEARD] for _, s in await own_counts(daemons)]
    while True:
        await asyncio.sleep(quiet_s)  # the quiet time being checked, not a synchronisation
        now = [s[HEARD] for _, s in await own_counts(daemons)]
        if now == heard:
            return round(time.monotonic() - began, 1)
        if time.monotonic() - began > limit_s:
            return None
        heard = now


def own_rates(
    before: list[tuple[float, dict[str, float]]], after: list[tuple[float, dict[str, float]]]
) -> tuple[float, float]:
    """(transactions per second of all daemons together, notifications each heard)."""
    rate, heard = 0.0, []
    for (t1, s1), (t2, s2) in zip(before, after, strict=True):
        rate += (s2[TX] - s1[TX]) / (t2 - t1)
        heard.append(s2[HEARD] - s1[HEARD])
    return rate, statistics.median(heard)


async def measure_idle(
    args: argparse.Namespace, server: str, name: str, dsn: str, daemons: list[DaemonProc]
) -> dict[str, Any]:
    n = len(daemons)
    settled = await settle(daemons, args.host_ttl, args.settle)
    pids = [d.proc.pid for d in daemons]
    # What was announced meanwhile: on one machine every daemon reads the same RAM, so
    # a swing of free memory (other work) makes all of them publish at once. None: the
    # database has no connection left for this script (the daemons' counts only).
    ear = await connect_or_none(dsn)
    heard: list[str] = []
    per: dict[str, int] = {}
    before, db_began = 0, 0.0
    if ear is not None:
        per = await connections(ear)
        await ear.add_listener("modeld_cluster", lambda *a: heard.append(a[3]))
        before, db_began = await xact(server, name, rollbacks=True), time.monotonic()
    own_before, ticks = await own_counts(daemons), [cpu_ticks(p) for p in pids]
    began, load = time.monotonic(), os.getloadavg()
    await asyncio.sleep(args.idle)  # the idle window being measured
    spent = time.monotonic() - began
    own_after, ticks2 = await own_counts(daemons), [cpu_ticks(p) for p in pids]
    own_tx, own_heard = own_rates(own_before, own_after)
    conns = [int(s[CONNS]) for _, s in own_after]
    cpu = [(b - a) / TICKS / spent * 100 for a, b in zip(ticks, ticks2, strict=True)]
    out: dict[str, Any] = {
        "connections_daemons": sum(conns),
        "connections_per_host_max_daemons": max(conns),
        "idle_tx_per_s_daemons": round(own_tx, 2),
        "idle_tx_per_s_per_host_daemons": round(own_tx / n, 3),
        "idle_notifications_daemons": own_heard,
        **process_figures(cpu, pids),
        "loadavg_idle_window": [round(x, 2) for x in load],
        "settled_s": settled,
    }
    if ear is not None:
        after = await xact(server, name, rollbacks=True)
        db_tx = max(after - before - 3, 0) / (time.monotonic() - db_began)
        await ear.close()
        out.update(
            connections=sum(per.values()),
            connections_per_host_max=max(per.values(), default=0),
            idle_tx_per_s=round(db_tx, 2),
            idle_tx_per_s_per_host=round(db_tx / n, 3),
            idle_notifications=len(heard),
            daemons_over_db=round(own_tx / db_tx, 3) if db_tx else None,
        )
    return out


async def measure_join_and_kill(
    args: argparse.Namespace, root: Path, dsn: str, daemons: list[DaemonProc]
) -> dict[str, Any]:
    """A host joins (seen by all from its registration), then is killed with -9."""
    joiner = await start(root, dsn, "joiner", args.host_ttl)
    joined = next(e for e in joiner.log if e.get("event") == "cluster_registered")
    seen = await until_all(daemons, lambda v: v.get("joiner") == pb.HOST_ALIVE, 30)
    killed_at = time.time()
    joiner.proc.kill()
    await joiner.proc.wait()
    noticed = await until_all(
        daemons, lambda v: v.get("joiner", pb.HOST_EXPIRED) != pb.HOST_ALIVE, 30
    )
    await joiner.close()
    return {
        "join_seen_by_all_s": None if seen is None else round(seen - logged_at(joined), 3),
        "kill9_noticed_by_all_s": None if noticed is None else round(noticed - killed_at, 3),
    }


async def measure_route(daemons: list[DaemonProc], ids: list[str]) -> dict[str, Any]:
    """Load on one host, then at once a Route on another: its first try."""
    owner, via = daemons[1], daemons[2]
    await owner.stub.Load(pb.LoadRequest(model="echo"), timeout=60)
    t0 = time.perf_counter()
    try:
        reply = await via.stub.Route(pb.RouteRequest(model="echo"), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return {"cross_host_first_route_ok": False, "error": f"{exc.code().name}: {exc.details()}"}
    took = round((time.perf_counter() - t0) * 1000, 2)
    await via.stub.Release(pb.ReleaseRequest(lease_id=reply.lease_id), timeout=10)
    return {
        "cross_host_first_route_ms": took,
        "cross_host_first_route_ok": reply.lease_id.startswith(f"{ids[1]}~"),
    }


async def measure_sigstop(daemons: list[DaemonProc], ids: list[str]) -> dict[str, Any]:
    """SIGSTOP of one host: until every other lists it not alive (its lease decides)."""
    stopped = daemons[-1]
    stopped_at = time.time()
    stopped.proc.send_signal(signal.SIGSTOP)
    try:
        gone = await until_all(
            daemons[:-1], lambda v: v.get(ids[-1], pb.HOST_EXPIRED) != pb.HOST_ALIVE, 60
        )
    finally:
        stopped.proc.send_signal(signal.SIGCONT)
    return {"sigstop_noticed_by_all_s": None if gone is None else round(gone - stopped_at, 3)}


async def stop(d: DaemonProc) -> None:
    if d.proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            d.proc.send_signal(signal.SIGCONT)
        with contextlib.suppress(Exception):
            await d.stop()
    await d.close()


async def main(args: argparse.Namespace) -> int:
    server = server_dsn()
    results: list[dict[str, Any]] = []
    for n in (int(x) for x in args.hosts.split(",")):
        with tempfile.TemporaryDirectory(prefix=f"modeld-scale-{n}-") as root:
            figures = await one_size(args, server, n, Path(root))
        print(json.dumps(figures), flush=True)
        results.append(figures)
    write_results("scale_bench.json", results)
    return 0


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="10,30", help="comma-separated cluster sizes")
    parser.add_argument("--host-ttl", type=float, default=10.0)
    parser.add_argument("--idle", type=float, default=20.0, help="idle window, seconds")
    parser.add_argument(
        "--settle", type=float, default=120.0, help="most seconds to wait for a quiet start"
    )
    return uvloop.run(main(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(cli())
