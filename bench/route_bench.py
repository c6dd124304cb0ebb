"""The route hot-path benchmark (`make bench`): a measurement, not a test.

Starts the daemon (`modeld serve`, echo model, 2 replicas loaded) and the
reference router (bench/reference.py: one SQLite transaction per call) as
subprocesses; this process is the client. It measures:

1. Route+Release pairs/s, p50/p99 and the daemon's CPU time per pair (from
   /proc/<pid>/stat) at each concurrency, next to an empty pair (two
   `grpc.health.v1` Checks) on the same daemon, the same pair on RouteStreams
   (one per worker), and the same pair on the reference, taken in alternating
   slices so drift hits all of them alike;
2. cold start: Route on an unloaded model until the lease, minus the backend's own
   spawn-to-listening and LoadModel time (it reports both in Status);
3. N concurrent Routes on an unloaded model: spawns seen on WatchEvents (must be 1)
   and the time until every Route has its lease;
4. the latency figures of bench/latency_figures.py (crash → FAILED, Health during
   an output flood, Ping with stalled followers), on a daemon of their own;
5. daemon start → health SERVING and the idle daemon's RSS, over a few starts, from
   compiled bytecode as a pip install has it (the port is polled, then health watched).

On 2 cores the client (this process) competes with the daemon for CPU, so pairs/s
ratios are squeezed towards 1 whenever the client is the bottleneck; the daemon's
CPU per pair does not depend on who waits for whom, and is the steadier figure.

Prints a table with the targets (MISSED where one is missed) and the previous
run's headline figures next to this run's (read from the JSON before it is
overwritten), writes JSON to bench/results/route_bench.json, and exits 0 unless
something could not be measured.
"""

import argparse
import asyncio
import compileall
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc

import harness
import latency_figures
import modeld
from harness import (
    CALL_LIMIT_S,
    HERE,
    BenchError,
    Command,
    EventWatch,
    Pair,
    Series,
    Server,
    daemon_command,
    empty_pair,
    free_port,
    route_pair,
    rpc_error,
    rss_mib,
    serving,
    spawn_all,
    stream_pair,
    warm_up,
)
from modeld._proto.backend import backend_pb2, backend_pb2_grpc
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc
from report import headline, render, targets

TOOL = "route_bench"
MODEL = "echo"
REPLICAS = 2
SLICES = 8
WARM_UP_S = 0.5
LIVE_STATES = frozenset({pb.STARTING, pb.WAITING_READY, pb.LOADING, pb.READY, pb.DRAINING})
CONFIG = (
    harness.ECHO_BACKEND
    + """
[models.echo]
backend = "echo"
max_replicas = {replicas}
"""
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.arguments(__doc__, "route_bench.json", 7.0, "figure")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--cold-runs", type=int, default=5, help="cold starts timed")
    parser.add_argument("--cold-routes", type=int, default=100, help="concurrent cold Routes")
    parser.add_argument("--starts", type=int, default=5, help="daemon starts timed")
    parser.add_argument(
        "--only",
        choices=["throughput", "startup"],
        help="measure just this section (for iterating on it); the rest is skipped",
    )
    return parser.parse_args(argv)


def progress(text: str) -> None:
    harness.progress(TOOL, text)


def section(name: str, work: Awaitable[dict[str, Any]]) -> Awaitable[dict[str, Any]]:
    return harness.section(TOOL, name, work)


def reference_command(tmp: Path, logs: Path) -> Command:
    addr = f"127.0.0.1:{free_port()}"
    db = tmp / "reference" / "reference.db"
    argv = [sys.executable, str(HERE / "reference.py"), "--addr", addr, "--db", str(db)]
    return Command("reference", argv, addr, logs / "reference.log")


async def load_replicas(stub: pb_grpc.ModelControlStub) -> dict[str, Any]:
    started = time.perf_counter()
    ready = await harness.load_ready(stub, MODEL, REPLICAS)
    return {"replicas": len(ready), "ms": round((time.perf_counter() - started) * 1000, 1)}


async def throughput(daemon: Server, reference: Server, args: argparse.Namespace) -> dict[str, Any]:
    pairs = {
        "route": route_pair(daemon.stub, MODEL),
        "empty": empty_pair(daemon.channel),
        "reference": route_pair(reference.stub, MODEL),
    }
    # Older checkouts (the previous run's commit, say) have no RouteStream.
    if hasattr(pb, "RouteStreamRequest"):
        pairs["stream"] = stream_pair(daemon.stub, MODEL)
    pid = daemon.proc.pid
    pids = {"route": pid, "empty": pid, "stream": pid, "reference": reference.proc.pid}
    rows: list[Series] = []
    for concurrency in args.concurrency:
        progress(f"pairs at concurrency {concurrency}")
        rows.extend(await measure_level(pairs, pids, concurrency, args.seconds))
    return {
        "series": [s.summary() for s in rows],
        "ratios": ratios(rows),
        "in_flight_after": await in_flight_total(daemon.stub),
    }


async def measure_level(
    pairs: dict[str, Pair], pids: dict[str, int], concurrency: int, seconds: float
) -> list[Series]:
    """Every workload in SLICES rounds, after a warm-up each.

    The reference opens each round and the daemon's workloads rotate behind it, so
    each follows the reference (whose fsyncs linger in the kernel) equally often.
    """
    series = {kind: Series(kind, concurrency, pids.get(kind)) for kind in pairs}
    for pair in pairs.values():
        await warm_up(pair, concurrency, WARM_UP_S)
    ours = [kind for kind in pairs if kind != "reference"]
    for n in range(SLICES):
        shift = n % len(ours)
        for kind in ["reference", *ours[shift:], *ours[:shift]]:
            await series[kind].run(pairs[kind], seconds / SLICES)
    return list(series.values())


def ratios(rows: list[Series]) -> dict[str, dict[str, float | None]]:
    by = {(s.kind, s.concurrency): s for s in rows}
    out: dict[str, dict[str, float | None]] = {}
    for concurrency in sorted({s.concurrency for s in rows}):
        route, empty = by[("route", concurrency)], by[("empty", concurrency)]
        cpu_route, cpu_empty = route.cpu_us_per_pair, empty.cpu_us_per_pair
        out[str(concurrency)] = {
            "route_over_empty": round(route.rate / empty.rate, 3),
            "cpu_route_over_empty": (
                round(cpu_route / cpu_empty, 3) if cpu_route and cpu_empty else None
            ),
            "modeld_over_reference": round(route.rate / by[("reference", concurrency)].rate, 3),
        }
        if (stream := by.get(("stream", concurrency))) is not None:
            out[str(concurrency)]["stream_over_empty"] = round(stream.rate / empty.rate, 3)
    return out


async def in_flight_total(stub: pb_grpc.ModelControlStub) -> int:
    """Leases still counted after every pair released its own: should be 0."""
    reply = await stub.ListReplicas(pb.ListReplicasRequest(model=MODEL), timeout=CALL_LIMIT_S)
    return sum(r.in_flight for r in reply.replicas)


async def backend_own_ms(address: str) -> float:
    """The backend's spawn-to-listening plus LoadModel time, as its Status reports them."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = backend_pb2_grpc.BackendStub(channel)  # type: ignore[no-untyped-call]
        status = await stub.Status(backend_pb2.HealthMessage(), timeout=CALL_LIMIT_S)
    breakdown = status.memory.breakdown
    if "startup_us" not in breakdown or "load_us" not in breakdown:
        raise BenchError(f"backend at {address} reports no startup_us/load_us: {dict(breakdown)}")
    return float(breakdown["startup_us"] + breakdown["load_us"]) / 1000


async def cold_start_once(stub: pb_grpc.ModelControlStub) -> dict[str, Any]:
    await stub.Unload(pb.UnloadRequest(model=MODEL, force=True), timeout=CALL_LIMIT_S)
    started = time.perf_counter()
    lease = await stub.Route(pb.RouteRequest(model=MODEL), timeout=CALL_LIMIT_S)
    total_ms = (time.perf_counter() - started) * 1000
    try:
        backend_ms = await backend_own_ms(lease.address)
    finally:
        await stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id), timeout=CALL_LIMIT_S)
    return {
        "total_ms": round(total_ms, 2),
        "backend_ms": round(backend_ms, 2),
        "overhead_ms": round(total_ms - backend_ms, 2),
        "cold_start_flag": lease.cold_start,
    }


async def cold_starts(stub: pb_grpc.ModelControlStub, runs: int) -> dict[str, Any]:
    progress(f"{runs} cold starts")
    samples = [await cold_start_once(stub) for _ in range(runs)]
    overheads = [s["overhead_ms"] for s in samples]
    return {
        "runs": samples,
        "total_median_ms": round(statistics.median(s["total_ms"] for s in samples), 2),
        "backend_median_ms": round(statistics.median(s["backend_ms"] for s in samples), 2),
        "overhead_median_ms": round(statistics.median(overheads), 2),
        "overhead_min_ms": min(overheads),
    }


async def coalesced_cold_routes(stub: pb_grpc.ModelControlStub, n: int) -> dict[str, Any]:
    progress(f"{n} concurrent Routes on a cold model")
    await stub.Load(pb.LoadRequest(model=MODEL, replicas=1), timeout=CALL_LIMIT_S)
    watch = EventWatch(stub, MODEL)
    try:
        unloaded = await stub.Unload(
            pb.UnloadRequest(model=MODEL, force=True), timeout=CALL_LIMIT_S
        )
        # Seeing the unloaded replicas stop proves the stream is live before the Routes.
        await watch.wait({r.id for r in unloaded.stopped}, {pb.STOPPED, pb.FAILED})
        before = set(watch.reached(pb.STARTING))
        started = time.perf_counter()
        calls = (stub.Route(pb.RouteRequest(model=MODEL), timeout=CALL_LIMIT_S) for _ in range(n))
        replies = await asyncio.gather(*calls, return_exceptions=True)
        all_leased_ms = (time.perf_counter() - started) * 1000
        leases = [r for r in replies if isinstance(r, pb.RouteResponse)]
        try:
            await watch.wait({lease.replica_id for lease in leases}, {pb.READY})
            listed = await stub.ListReplicas(
                pb.ListReplicasRequest(model=MODEL), timeout=CALL_LIMIT_S
            )
        finally:
            await release_all(stub, leases)
    finally:
        await watch.close()
    errors = [rpc_error(r) for r in replies if isinstance(r, grpc.aio.AioRpcError)]
    return {
        "routes": n,
        "leases": len(leases),
        "errors": len(replies) - len(leases),
        "first_error": errors[0] if errors else "",
        "spawns": len(watch.reached(pb.STARTING) - before),
        "replicas_leased": len({lease.replica_id for lease in leases}),
        "live_replicas": sum(r.state in LIVE_STATES for r in listed.replicas),
        "all_leased_ms": round(all_leased_ms, 1),
    }


async def release_all(stub: pb_grpc.ModelControlStub, leases: list[pb.RouteResponse]) -> None:
    await asyncio.gather(
        *(
            stub.Release(pb.ReleaseRequest(lease_id=x.lease_id), timeout=CALL_LIMIT_S)
            for x in leases
        )
    )


async def measure(daemon: Server, reference: Server, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"setup": setup(args)}
    results["load"] = await section("load", load_replicas(daemon.stub))
    if "error" not in results["load"]:
        work = throughput(daemon, reference, args)
        results["throughput"] = await section("throughput", work)
    if args.only:
        return results
    results["cold_start"] = await section("cold start", cold_starts(daemon.stub, args.cold_runs))
    work = coalesced_cold_routes(daemon.stub, args.cold_routes)
    results["coalesce"] = await section("coalescing", work)
    results["latency"] = await section("latency figures", latency_figures.measure())
    return results


async def start_once(work: Path, logs: Path) -> dict[str, float]:
    """One daemon start: spawn → health SERVING (ms), then its RSS while idle (MiB)."""
    command = daemon_command("startup", CONFIG, work, logs / "startup.log", replicas=REPLICAS)
    started = time.perf_counter()
    (server,) = await spawn_all([command])
    try:
        await server.wait_health_serving()
        serving_ms = (time.perf_counter() - started) * 1000
        # One call answered after SERVING: the daemon is idle, its start behind it.
        await server.stub.Ping(pb.PingRequest(), timeout=CALL_LIMIT_S)
        return {"serving_ms": round(serving_ms, 1), "rss_mib": round(rss_mib(server.proc.pid), 1)}
    finally:
        await server.stop()


async def startup(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    """`args.starts` starts on one state directory (the first creates its database)."""
    # A daemon installed by pip starts from the .pyc files written at install; an
    # editable checkout under PYTHONDONTWRITEBYTECODE has none unless they are made
    # (`make` does), and each start would time compiling modeld instead.
    compileall.compile_dir(Path(modeld.__file__).parent, quiet=1)
    progress(f"{args.starts} daemon starts")
    with tempfile.TemporaryDirectory(prefix="modeld-start-") as tmp:
        runs = [await start_once(Path(tmp), logs) for _ in range(args.starts)]
    return {
        "runs": runs,
        "serving_median_ms": statistics.median(r["serving_ms"] for r in runs),
        "serving_min_ms": min(r["serving_ms"] for r in runs),
        "rss_median_mib": statistics.median(r["rss_mib"] for r in runs),
    }


def setup(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "seconds_per_figure": args.seconds,
        "slices": SLICES,
        "warm_up_s": WARM_UP_S,
        "model": MODEL,
        "replicas": REPLICAS,
        "cold_runs": args.cold_runs,
        "cold_routes": args.cold_routes,
        "starts": args.starts,
        "commit": commit(),
        "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def commit() -> str:
    """The checkout's commit (with "+dirty" for uncommitted changes), for the record."""
    try:
        head = subprocess.run(
            ["git", "-C", str(HERE), "describe", "--always", "--dirty=+dirty"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip()


def previous(out: Path) -> dict[str, Any] | None:
    """The headline figures of the last run that wrote `out`, before this run replaces it."""
    try:
        return headline(json.loads(out.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    logs = args.out.parent
    last = previous(args.out)
    started = time.perf_counter()
    if args.only == "startup":
        results: dict[str, Any] = {"setup": setup(args)}
    else:
        results = await run_daemon(args, logs)
    if args.only in (None, "startup"):
        results["startup"] = await section("startup", startup(args, logs))
    results["setup"]["measured_s"] = round(time.perf_counter() - started, 1)
    results["previous"] = last
    return results


async def run_daemon(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="modeld-bench-") as tmp:
        progress("starting the daemon and the reference")
        commands = [
            daemon_command("modeld", CONFIG, Path(tmp), logs / "modeld.log", replicas=REPLICAS),
            reference_command(Path(tmp), logs),
        ]
        async with serving(commands) as (daemon, reference):
            return await measure(daemon, reference, args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return harness.bench_main(TOOL, args.out, lambda: run(args), targets, render)


if __name__ == "__main__":
    sys.exit(main())
