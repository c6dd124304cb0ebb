"""The route hot-path benchmark (`make bench`): a measurement, not a test.

Starts the daemon (`modeld serve`, echo model, 2 replicas loaded) and the
reference router (bench/reference.py: one SQLite transaction per call) as
subprocesses; this process is the client. It measures:

1. Route+Release pairs/s and p50/p99 at each concurrency, next to an empty pair
   (Ping+Ping) on the same daemon and the same pair on the reference, taken in
   alternating slices so drift hits all three alike;
2. cold start: Route on an unloaded model until the lease, minus the backend's own
   spawn-to-listening and LoadModel time (it reports both in Status);
3. N concurrent Routes on an unloaded model: spawns seen on WatchEvents (must be 1)
   and the time until every Route has its lease;
4. the latency figures of bench/latency_figures.py (crash → FAILED, Health during
   an output flood, Ping with stalled followers), on a daemon of their own.

Prints a table with the targets (MISSED where one is missed), writes JSON to
bench/results/route_bench.json, and exits 0 unless something could not be measured.
"""

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc

import harness
import latency_figures
from harness import (
    CALL_LIMIT_S,
    HERE,
    BenchError,
    Command,
    EventWatch,
    Pair,
    Series,
    Server,
    bench_main,
    daemon_command,
    empty_pair,
    free_port,
    route_pair,
    rpc_error,
    serving,
    warm_up,
)
from modeld._proto.backend import backend_pb2, backend_pb2_grpc
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc
from report import render, targets

TOOL = "route_bench"
MODEL = "echo"
REPLICAS = 2
SLICES = 8
WARM_UP_S = 0.5
LIVE_STATES = frozenset({pb.STARTING, pb.WAITING_READY, pb.LOADING, pb.READY, pb.DRAINING})
CONFIG = """listen = ["{addr}"]
state_dir = "{state}"
models_dir = "{models}"
log_level = "warning"
shutdown_grace = "5s"

[backends.echo]
command = ["{{python}}", "-m", "modeld.backends.echo", "--addr", "{{addr}}"]

[models.echo]
backend = "echo"
max_replicas = {replicas}
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.arguments(__doc__, "route_bench.json", 7.0, "figure")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--cold-runs", type=int, default=5, help="cold starts timed")
    parser.add_argument("--cold-routes", type=int, default=100, help="concurrent cold Routes")
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
    reply = await stub.Load(pb.LoadRequest(model=MODEL, replicas=REPLICAS), timeout=CALL_LIMIT_S)
    ready = [r.id for r in reply.replicas if r.state == pb.READY]
    if len(ready) < REPLICAS:
        raise BenchError(f"Load gave {len(ready)} READY replicas, wanted {REPLICAS}")
    return {"replicas": len(ready), "ms": round((time.perf_counter() - started) * 1000, 1)}


async def throughput(daemon: Server, reference: Server, args: argparse.Namespace) -> dict[str, Any]:
    pairs = {
        "route": route_pair(daemon.stub, MODEL),
        "empty": empty_pair(daemon.stub),
        "reference": route_pair(reference.stub, MODEL),
    }
    rows: list[Series] = []
    for concurrency in args.concurrency:
        progress(f"pairs at concurrency {concurrency}")
        rows.extend(await measure_level(pairs, concurrency, args.seconds))
    return {
        "series": [s.summary() for s in rows],
        "ratios": ratios(rows),
        "in_flight_after": await in_flight_total(daemon.stub),
    }


async def measure_level(pairs: dict[str, Pair], concurrency: int, seconds: float) -> list[Series]:
    """Every workload in SLICES rounds, after a warm-up each.

    The reference opens each round and route/empty swap places every round, so each
    of the two follows the reference (whose fsyncs linger in the kernel) equally often.
    """
    series = {kind: Series(kind, concurrency) for kind in pairs}
    for pair in pairs.values():
        await warm_up(pair, concurrency, WARM_UP_S)
    for n in range(SLICES):
        order = ("reference", "route", "empty") if n % 2 == 0 else ("reference", "empty", "route")
        for kind in order:
            await series[kind].run(pairs[kind], seconds / SLICES)
    return list(series.values())


def ratios(rows: list[Series]) -> dict[str, dict[str, float]]:
    rate = {(s.kind, s.concurrency): s.rate for s in rows}
    out = {}
    for concurrency in sorted({s.concurrency for s in rows}):
        route = rate[("route", concurrency)]
        out[str(concurrency)] = {
            "route_over_empty": round(route / rate[("empty", concurrency)], 3),
            "modeld_over_reference": round(route / rate[("reference", concurrency)], 3),
        }
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
    results["cold_start"] = await section("cold start", cold_starts(daemon.stub, args.cold_runs))
    work = coalesced_cold_routes(daemon.stub, args.cold_routes)
    results["coalesce"] = await section("coalescing", work)
    results["latency"] = await section("latency figures", latency_figures.measure())
    return results


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
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    logs = args.out.parent
    with tempfile.TemporaryDirectory(prefix="modeld-bench-") as tmp:
        progress("starting the daemon and the reference")
        commands = [
            daemon_command("modeld", CONFIG, Path(tmp), logs / "modeld.log", replicas=REPLICAS),
            reference_command(Path(tmp), logs),
        ]
        async with serving(commands) as (daemon, reference):
            started = time.perf_counter()
            results = await measure(daemon, reference, args)
            results["setup"]["measured_s"] = round(time.perf_counter() - started, 1)
            return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return bench_main(TOOL, args.out, lambda: run(args), targets, render)


if __name__ == "__main__":
    sys.exit(main())
