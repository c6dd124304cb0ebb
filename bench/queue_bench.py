"""Queue benchmark (part of `make bench`): a measurement, not a test.

Starts the daemon (`modeld serve`) with one model of `parallel = 2` and
`max_replicas = 1`: its one replica takes two leases at once and every other Route
waits in the model's FIFO queue. This process is the client: `--concurrency`
closed-loop clients each Route, hold the lease for `--hold-ms` (the request a real
client would send), and Release. Measured:

1. the queue wait: how long each Route took to get its lease (p50, p99, max);
2. what a fair queue predicts for that wait: with C clients and P slots, a Route
   waits for the C - P leases ahead of it to be served at the measured rate R of
   pairs/s, (C - P) / R; the p99 over that figure says whether anybody was passed
   over (FIFO keeps it near 1, starvation would grow it with the run);
3. the daemon's own histogram (`modeld_queue_wait_seconds`) and the Routes it saw
   queued, read from its metrics endpoint, next to the client's figures.

Output: a table with the targets and bench/results/queue_bench.json (`harness.bench_main`).
"""

import argparse
import asyncio
import sys
import time
import urllib.request
from typing import Any

import harness
from harness import CALL_LIMIT_S, BenchError, Series, Server, Target, free_port, latency_summary
from modeld._proto.modeld.v1 import modeld_pb2 as pb

TOOL = "queue_bench"
MODEL = "pair"
PARALLEL = 2
CONFIG = (
    'metrics_listen = "127.0.0.1:{metrics_port}"\n'
    + harness.ECHO_BACKEND
    + """
[models.pair]
backend = "echo"
max_replicas = 1
parallel = 2
"""
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.arguments(__doc__, "queue_bench.json", 8.0, "run")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--hold-ms", type=float, default=5.0)
    return parser.parse_args(argv)


def progress(text: str) -> None:
    harness.progress(TOOL, text)


def held_pair(daemon: Server, hold_s: float, waits: list[float]) -> harness.Pair:
    async def pair() -> None:
        began = time.perf_counter()
        lease = await daemon.stub.Route(pb.RouteRequest(model=MODEL), timeout=CALL_LIMIT_S)
        waits.append(time.perf_counter() - began)
        await asyncio.sleep(hold_s)  # the client's request on its lease, not a sync
        await daemon.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id), timeout=CALL_LIMIT_S)

    return pair


def scrape(port: int) -> dict[str, float]:
    """The daemon's queue figures: waits observed and their sum, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    figures: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("modeld_queue_wait_seconds_count", "modeld_queue_wait_seconds_sum"):
            if line.startswith(name + "{") and f'model="{MODEL}"' in line:
                figures[name] = float(line.rsplit(" ", 1)[1])
    return figures


async def measure(daemon: Server, args: argparse.Namespace, metrics_port: int) -> dict[str, Any]:
    await harness.load_ready(daemon.stub, MODEL)
    hold_s = args.hold_ms / 1000
    alone: list[float] = []
    progress("one client: Route with nothing queued")
    await Series("alone", 1).run(held_pair(daemon, hold_s, alone), args.seconds / 4)
    waits: list[float] = []
    progress(f"{args.concurrency} clients on {PARALLEL} slots")
    series = Series("saturated", args.concurrency)
    await series.run(held_pair(daemon, hold_s, waits), args.seconds)
    if len(waits) < 10 * args.concurrency:
        raise BenchError(f"only {len(waits)} Routes completed")
    daemon_figures = await asyncio.to_thread(scrape, metrics_port)
    predicted = max(args.concurrency - PARALLEL, 0) / series.rate if series.rate else 0.0
    saturated = latency_summary(waits)
    return {
        "concurrency": args.concurrency,
        "parallel": PARALLEL,
        "hold_ms": args.hold_ms,
        "alone": latency_summary(alone),
        "saturated": saturated,
        "pairs_per_s": round(series.rate, 1),
        "predicted_wait_ms": round(predicted * 1000, 3),
        "p99_over_predicted": round(saturated["p99_ms"] / (predicted * 1000), 3)
        if predicted
        else None,
        "daemon": daemon_figures,
    }


def targets(results: dict[str, Any]) -> list[Target]:
    m = results.get("measure", {})
    if "error" in m or not m:
        return []
    out = [
        Target("queue wait p50 (ms)", m["saturated"]["p50_ms"], "report", True),
        Target("queue wait p99 (ms)", m["saturated"]["p99_ms"], "report", True),
    ]
    ratio = m["p99_over_predicted"]
    if ratio is not None:
        # A FIFO hand-off keeps every wait near the fair share; 2x leaves room for a
        # shared machine's scheduling, starvation would be far past it.
        out.append(Target("p99 wait / fair-queue wait", ratio, "<= 2.0", ratio <= 2.0))
    return out


def render(results: dict[str, Any], checks: list[Target]) -> str:
    m = results.get("measure", {})
    if "error" in m:
        return f"{TOOL}: {m['error']}"
    s, a = m["saturated"], m["alone"]
    lines = [
        f"Queue: {m['concurrency']} clients, parallel {m['parallel']}, max_replicas 1, "
        f"hold {m['hold_ms']} ms; {m['pairs_per_s']} pairs/s",
        f"  Route alone:  p50 {a['p50_ms']} ms  p99 {a['p99_ms']} ms",
        f"  queue wait:   p50 {s['p50_ms']} ms  p99 {s['p99_ms']} ms  max {s['max_ms']} ms "
        f"(fair queue: {m['predicted_wait_ms']} ms)",
        f"  daemon's histogram: {m['daemon']}",
    ]
    return "\n".join(lines + harness.targets_table(checks))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    metrics_port = free_port()
    log = args.out.parent / "queue-modeld.log"
    async with harness.daemon_serving(TOOL, CONFIG, log, metrics_port=metrics_port) as daemon:
        work = measure(daemon, args, metrics_port)
        return {"measure": await harness.section(TOOL, "measure", work)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return harness.bench_main(TOOL, args.out, lambda: run(args), targets, render)


if __name__ == "__main__":
    sys.exit(main())
