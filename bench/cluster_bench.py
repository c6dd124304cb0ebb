"""The cluster benchmark (`make bench-cluster`): a measurement, not a test.

Three real daemons (a, b, c) on one PostgreSQL (MODELD_TEST_PG_DSN, else
postgresql://root@127.0.0.1:5432/postgres; a fresh database, dropped at the end),
the echo model loaded on b only. It measures:

1. database transactions per warm Route: `pg_stat_database.xact_commit` of the
   cluster's database over N warm Route+Release pairs sent through a (forwarded to
   b), next to the same duration with no requests at all (heartbeats, resyncs);
2. forwarded (client → a → b) next to direct (client → b) Route+Release p50, in
   alternating slices, with a bare Ping to b in the same slices: one extra unary
   gRPC round trip on this machine, the floor under each forwarding hop;
3. failover: kill -9 of b (and its backend), then the time until a Route on a
   succeeds again (a starts the model itself), next to a plain cold Load's time;
4. cold starts (`measure_cold`, three fresh daemons): 100 concurrent Routes for a
   model running nowhere, spread over the three; the time from the first Route
   sent to the last lease, minus the backend's own start (spawn to listening plus
   LoadModel, as its Status reports), and the backends spawned in the cluster.

Prints the figures and writes bench/results/cluster_bench.json.
"""

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import uvloop

from cluster_setup import (
    HERE,
    database_dsn,
    fresh_database,
    host_config,
    server_dsn,
    write_results,
)
from cluster_setup import xact as read_xact
from daemon_proc import DaemonProc, start_daemon
from modeld._proto.backend import backend_pb2, backend_pb2_grpc
from modeld._proto.modeld.v1 import modeld_pb2 as pb

SLICES = 8
# The plain cold Load runs a model of its own: max_replicas counts the cluster.
LOAD_MODEL = '[models.echo_load]\nbackend = "echo"\n'


async def xact(server: str, name: str) -> int:
    # Backends report their counters at most once a second: let them.
    await asyncio.sleep(1.5)
    return await read_xact(server, name)


async def pairs(
    via: DaemonProc, n: int, concurrency: int, release_at: DaemonProc | None = None
) -> list[float]:
    """Route+Release pairs through `via`; the Release goes to `release_at` when given
    (a client releasing at the RouteResponse's owner_address)."""
    times: list[float] = []
    route = pb.RouteRequest(model="echo")
    releaser = (release_at or via).stub

    async def worker(count: int) -> None:
        for _ in range(count):
            start = time.perf_counter()
            lease = await via.stub.Route(route, timeout=30)
            reply = await releaser.Release(pb.ReleaseRequest(lease_id=lease.lease_id), timeout=30)
            times.append(time.perf_counter() - start)
            if not reply.released:
                raise RuntimeError("a lease was not released")

    await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
    return times


async def pings(to: DaemonProc, n: int) -> list[float]:
    times: list[float] = []
    for _ in range(n):
        start = time.perf_counter()
        await to.stub.Ping(pb.PingRequest(), timeout=30)
        times.append(time.perf_counter() - start)
    return times


async def measure_xact(
    args: argparse.Namespace, server: str, name: str, a: DaemonProc
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    before = await xact(server, name)
    t0 = time.perf_counter()
    await pairs(a, args.pairs, args.concurrency)
    busy_s = time.perf_counter() - t0
    during = await xact(server, name)
    t1 = time.perf_counter()
    await asyncio.sleep(busy_s)
    idle = await xact(server, name)
    # The periodic work (heartbeats, resyncs, leader checks, spec reloads) costs what
    # the same time idle costs. On top, load may make b publish its replica's load and
    # its host figures at most once a second each, and a and c reread b after each:
    # at most window + 1 of each in a window (one at each edge), so a short run is fair.
    load_per_s = 2 * (1 + 2)
    out["warm_window_s"] = round(t1 - t0, 2)
    out["xact_during_pairs"] = during - before
    out["xact_same_time_idle"] = idle - during
    out["xact_budget_during_pairs"] = round((idle - during) + load_per_s * (t1 - t0 + 1), 1)
    out["xact_within_budget"] = during - before <= out["xact_budget_during_pairs"]
    out["xact_per_route"] = round((during - before) / args.pairs, 4)

    return out


async def measure_latency(args: argparse.Namespace, a: DaemonProc, b: DaemonProc) -> dict[str, Any]:
    out: dict[str, Any] = {}
    series: dict[str, list[float]] = {
        "direct": [],
        "forwarded": [],
        "release_at_owner": [],
        "ping": [],
    }
    for _ in range(SLICES):
        n = args.latency_pairs // SLICES
        series["forwarded"] += await pairs(a, n, 1)
        series["direct"] += await pairs(b, n, 1)
        series["release_at_owner"] += await pairs(a, n, 1, release_at=b)
        series["ping"] += await pings(b, n)
    p50 = {k: statistics.median(v) * 1000 for k, v in series.items()}
    out["ping_p50_ms"] = round(p50.pop("ping"), 3)
    out["pair_p50_ms"] = {k: round(v, 3) for k, v in p50.items()}
    # Route and Release both through a: two extra hops. Releasing at owner_address: one.
    out["forward_added_p50_ms"] = round(p50["forwarded"] - p50["direct"], 3)
    out["forward_added_p50_ms_release_at_owner"] = round(p50["release_at_owner"] - p50["direct"], 3)

    return out


async def measure(args: argparse.Namespace, server: str, name: str, root: Path) -> dict[str, Any]:
    dsn = database_dsn(server, name)
    hosts: dict[str, DaemonProc] = {}
    for host in ("a", "b", "c"):
        config, addr = host_config(root / host, dsn, host, args.host_ttl, LOAD_MODEL)
        hosts[host] = await start_daemon(config, addr)
    a, b, c = hosts["a"], hosts["b"], hosts["c"]
    try:
        for d in hosts.values():
            await d.wait_log(lambda e: e.get("event") == "cluster_registered", 20)
        loaded = await a.stub.Load(pb.LoadRequest(model="echo", host="b"), timeout=60)
        replica = loaded.replicas[0]
        await a.wait_log(
            lambda e: (
                e.get("event") == "cluster_view_changed" and f"b/{replica.id}" in e.get("ready", [])
            ),
            20,
        )
        await pairs(a, 200, 4)
        out: dict[str, Any] = {"host_ttl_s": args.host_ttl, "pairs": args.pairs}

        out.update(await measure_xact(args, server, name, a))
        out.update(await measure_latency(args, a, b))
        cold_started = time.perf_counter()
        await c.stub.Load(pb.LoadRequest(model="echo_load"), timeout=60)
        out["cold_load_s"] = round(time.perf_counter() - cold_started, 3)
        await c.stub.Unload(pb.UnloadRequest(model="echo_load", force=True), timeout=60)
        await a.wait_log(
            lambda e: (
                e.get("event") == "cluster_view_changed"
                and not any(r.startswith("c/") for r in e.get("ready", []))
            ),
            20,
        )

        b.proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(replica.pid, signal.SIGKILL)
        killed = time.perf_counter()
        await b.proc.wait()
        while True:
            try:
                reply = await a.stub.Route(pb.RouteRequest(model="echo"), timeout=60)
                break
            except Exception:  # a bench retries until the survivors serve
                await asyncio.sleep(0.05)
        out["failover_s"] = round(time.perf_counter() - killed, 3)
        out["failover_cold_start"] = reply.cold_start
        out["failover_target_s"] = round(args.host_ttl + out["cold_load_s"] + 1.0, 3)
        return out
    finally:
        for d in hosts.values():
            if d.proc.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await d.stop()
            await d.close()


def cold_catalog(gate: Path, rounds: int) -> str:
    """Models cold0..coldN on a backend that marks each start in `gate` (gate open)."""
    script = HERE.parent / "tests" / "gated_backend.py"
    text = (
        f'[backends.gated]\ncommand = ["{sys.executable}", "{script}", "{gate}", '
        '"--addr", "{addr}"]\nstop_grace = "2s"\n'
    )
    return text + "".join(f'[models.cold{i}]\nbackend = "gated"\n' for i in range(rounds))


async def backend_own_ms(address: str) -> float:
    """The backend's spawn-to-listening plus LoadModel time, as its Status reports them."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = backend_pb2_grpc.BackendStub(channel)  # type: ignore[no-untyped-call]
        status = await stub.Status(backend_pb2.HealthMessage(), timeout=10)
    breakdown = status.memory.breakdown
    return float(breakdown["startup_us"] + breakdown["load_us"]) / 1000


async def cold_round(
    hosts: list[DaemonProc], model: str, routes: int, gate: Path
) -> dict[str, Any]:
    """One cold model: its figures, and where the time went (ms from the first Route
    sent, by the daemons' log clocks): the claim taken, the replica bound, the first
    and the last lease (the leases after the first are mostly forwarded Routes)."""
    before = spawned(gate)
    marks = [len(d.log) for d in hosts]
    leased: list[float] = []

    async def one(n: int) -> pb.RouteResponse:
        reply: pb.RouteResponse = await hosts[n % 3].stub.Route(
            pb.RouteRequest(model=model), timeout=60
        )
        leased.append(time.perf_counter())
        return reply

    wall, started = time.time(), time.perf_counter()
    replies = await asyncio.gather(*(one(n) for n in range(routes)))
    total_ms = (time.perf_counter() - started) * 1000
    backend_ms = await backend_own_ms(replies[0].address)
    bound_ms = logged_ms(hosts, marks, "cluster_claim_bound", wall)
    seen_ms = seen_everywhere_ms(hosts, marks, replies[0].replica_id, wall)
    return {
        "total_ms": round(total_ms, 2),
        "backend_ms": round(backend_ms, 2),
        "overhead_ms": round(total_ms - backend_ms, 2),
        "claim_ms": logged_ms(hosts, marks, "cluster_claim_taken", wall),
        "bound_ms": bound_ms,
        "bound_to_last_lease_ms": round(total_ms - bound_ms, 2) if bound_ms else None,
        "bound_to_seen_everywhere_ms": round(seen_ms - bound_ms, 2)
        if seen_ms and bound_ms
        else None,
        "first_lease_ms": round((min(leased) - started) * 1000, 2),
        "spawns": spawned(gate) - before,
        "replicas": len({r.replica_id for r in replies}),
    }


def spawned(gate: Path) -> int:
    return len(list(gate.glob("spawn-*")))


def seen_everywhere_ms(
    hosts: list[DaemonProc], marks: list[int], replica_id: str, wall: float
) -> float | None:
    """When the last of the other hosts had `replica_id` READY in its view (its bind's
    notification, else a reread), in ms after `wall`; the binder itself is left out."""
    firsts = []
    for d, mark in zip(hosts, marks, strict=True):
        entries = d.log[mark:]
        if any(e.get("event") == "cluster_claim_bound" for e in entries):
            continue
        seen = [
            datetime.fromisoformat(e["timestamp"]).timestamp()
            for e in entries
            if e.get("event") == "cluster_view_changed"
            and any(r.endswith("/" + replica_id) for r in e.get("ready", []))
        ]
        if not seen:
            return None
        firsts.append(min(seen))
    return round((max(firsts) - wall) * 1000, 2) if firsts else None


def median_of(rounds: list[dict[str, Any]], key: str) -> float | None:
    figures = [r[key] for r in rounds if r[key] is not None]
    return round(statistics.median(figures), 2) if figures else None


def logged_ms(hosts: list[DaemonProc], marks: list[int], event: str, wall: float) -> float | None:
    """When `event` was first logged by any host since `marks`, in ms after `wall`."""
    times = [
        datetime.fromisoformat(e["timestamp"]).timestamp()
        for d, mark in zip(hosts, marks, strict=True)
        for e in d.log[mark:]
        if e.get("event") == event and "timestamp" in e
    ]
    return round((min(times) - wall) * 1000, 2) if times else None


async def measure_cold(args: argparse.Namespace, dsn: str, root: Path) -> dict[str, Any]:
    gate = root / "gate"
    gate.mkdir(parents=True)
    (gate / "open").touch()
    hosts: list[DaemonProc] = []
    for host in ("ca", "cb", "cc"):
        folder = root / host
        config, addr = host_config(folder, dsn, host, args.host_ttl, LOAD_MODEL)
        config.write_text(config.read_text() + cold_catalog(gate, args.cold_rounds))
        hosts.append(await start_daemon(config, addr))
    try:
        for d in hosts:
            await d.wait_log(lambda e: e.get("event") == "cluster_registered", 20)
        rounds = [
            await cold_round(hosts, f"cold{i}", args.cold_routes, gate)
            for i in range(args.cold_rounds)
        ]
        overheads = [r["overhead_ms"] for r in rounds]
        return {
            "cold_routes": args.cold_routes,
            "cold_rounds": rounds,
            "cold_overhead_ms_median": round(statistics.median(overheads), 2),
            "cold_overhead_ms_max": max(overheads),
            "cold_overhead_target_ms": 100,
            "cold_claim_ms_median": median_of(rounds, "claim_ms"),
            "cold_bound_to_last_lease_ms_median": median_of(rounds, "bound_to_last_lease_ms"),
            "cold_bound_to_seen_everywhere_ms": [r["bound_to_seen_everywhere_ms"] for r in rounds],
            "cold_spawns_per_model": sorted({r["spawns"] for r in rounds}),
        }
    finally:
        for d in hosts:
            with contextlib.suppress(TimeoutError):
                await d.stop()
            await d.close()


async def main(args: argparse.Namespace) -> int:
    server = server_dsn()
    async with fresh_database(server, "modeld_bench") as (name, dsn):
        with tempfile.TemporaryDirectory(prefix="modeld-cluster-bench-") as root:
            if not args.cold_only:
                out = await measure(args, server, name, Path(root))
            else:
                out = {}
            out.update(await measure_cold(args, dsn, Path(root) / "cold"))
    print(write_results("cluster_bench.json", out))
    return 0


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency-pairs", type=int, default=2_000)
    parser.add_argument("--host-ttl", type=float, default=10.0)
    parser.add_argument("--cold-routes", type=int, default=100)
    parser.add_argument("--cold-rounds", type=int, default=5)
    parser.add_argument("--cold-only", action="store_true", help="only the cold-start section")
    return uvloop.run(main(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(cli())
