"""Affinity benchmark (part of `make bench`): a measurement, not a test.

Starts the daemon (`modeld serve`, echo model, 3 replicas loaded); this process is
the client. With KEYS affinity keys it measures:

1. each key's home: the replica its first Route got with nothing held;
2. hit rate: the share of Routes that land on their key's home, in a closed loop of
   `--concurrency` clients each taking keys round-robin (Route, Release); at
   concurrency 1 nothing is held, so every Route should hit; above it the load bound
   (`[routing] affinity_slack`) sends some elsewhere;
3. load spread: Routes per replica in that loop, max over mean (1.0 is even);
4. Route cost: Route+Release pairs/s with a key over pairs/s without one, in
   alternating slices on the same daemon (1.0: affinity costs nothing; two closed
   loops on a shared machine drift by more than the difference, so it is reported);
5. the pure pick (`policy.picker.pick_replica`) with and without the ring, in this
   process: microseconds per pick, their ratio, and what the key adds as a share of
   a whole Route+Release (p50 at concurrency 1): the judged figure.

Output: a table with the targets and bench/results/affinity_bench.json (`harness.bench_main`).
"""

import argparse
import itertools
import sys
import time
import timeit
from collections import Counter
from typing import Any

import harness
from harness import CALL_LIMIT_S, BenchError, Series, Server, Target, warm_up
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc
from modeld.policy.affinity import AffinityInput, build_ring
from modeld.policy.picker import pick_replica
from modeld.policy.view import ReplicaView
from modeld.state import ReplicaState

TOOL = "affinity_bench"
MODEL = "trio"
REPLICAS = 3
KEYS = [f"session-{i}" for i in range(300)]
SLICES = 12
WARM_UP_S = 0.3
CONFIG = (
    harness.ECHO_BACKEND
    + """
[models.trio]
backend = "echo"
max_replicas = 3
"""
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.arguments(__doc__, "affinity_bench.json", 4.0, "figure")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    return parser.parse_args(argv)


def progress(text: str) -> None:
    harness.progress(TOOL, text)


async def route_once(stub: pb_grpc.ModelControlStub, key: str) -> str:
    lease = await stub.Route(pb.RouteRequest(model=MODEL, affinity_key=key), timeout=CALL_LIMIT_S)
    await stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id), timeout=CALL_LIMIT_S)
    return str(lease.replica_id)


async def homes(stub: pb_grpc.ModelControlStub) -> dict[str, str]:
    return {key: await route_once(stub, key) for key in KEYS}


async def hit_rate(
    stub: pb_grpc.ModelControlStub, home: dict[str, str], concurrency: int, seconds: float
) -> dict[str, Any]:
    """A closed loop over the keys: how many Routes hit the key's home, and the spread."""
    keys = itertools.cycle(KEYS)
    landed: Counter[str] = Counter()
    hits = 0

    async def pair() -> None:
        nonlocal hits
        key = next(keys)
        replica = await route_once(stub, key)
        landed[replica] += 1
        hits += replica == home[key]

    series = Series("affinity", concurrency)
    await series.run(pair, seconds)
    total = sum(landed.values())
    if total == 0:
        raise BenchError("no Route completed")
    mean = total / REPLICAS
    return {
        "concurrency": concurrency,
        "routes": total,
        "hit_rate": round(hits / total, 4),
        "spread_max_over_mean": round(max(landed.values()) / mean, 3),
        "per_replica": sorted(landed.values()),
    }


def keyed_pair(stub: pb_grpc.ModelControlStub, keyed: bool) -> harness.Pair:
    """Route+Release with a key, or the same calls built the same way with none."""
    keys = itertools.cycle(KEYS if keyed else [""])

    async def pair() -> None:
        await route_once(stub, next(keys))

    return pair


async def route_cost(daemon: Server, concurrency: int, seconds: float) -> dict[str, Any]:
    pairs = {"keyed": keyed_pair(daemon.stub, True), "plain": keyed_pair(daemon.stub, False)}
    series = {kind: Series(kind, concurrency) for kind in pairs}
    for pair in pairs.values():
        await warm_up(pair, concurrency, WARM_UP_S)
    for n in range(SLICES):
        for kind in ("keyed", "plain") if n % 2 == 0 else ("plain", "keyed"):
            await series[kind].run(pairs[kind], seconds / SLICES)
    return {
        "concurrency": concurrency,
        "series": [s.summary() for s in series.values()],
        "keyed_over_plain": round(series["keyed"].rate / series["plain"].rate, 3),
    }


def pure_pick() -> dict[str, Any]:
    """The pick alone: 3 READY views, with a cached ring and a key vs without."""
    views = [
        ReplicaView(
            f"r{i}",
            MODEL,
            ReplicaState.READY,
            i % 2,
            100.0 + i,
            None,
            None,
            (0,),
            1 << 30,
            False,
            (),
            None,
            None,
        )
        for i in range(REPLICAS)
    ]
    free = {0: 10 << 30}
    affinity = AffinityInput(build_ring(v.id for v in views), "session-7")
    n = 20_000
    plain = min(timeit.repeat(lambda: pick_replica(views, free), number=n, repeat=5)) / n
    keyed = (
        min(timeit.repeat(lambda: pick_replica(views, free, affinity=affinity), number=n, repeat=5))
        / n
    )
    ring = min(timeit.repeat(lambda: build_ring(v.id for v in views), number=50, repeat=3)) / 50
    return {
        "plain_us": round(plain * 1e6, 2),
        "keyed_us": round(keyed * 1e6, 2),
        "keyed_over_plain": round(keyed / plain, 2),
        "ring_build_us": round(ring * 1e6, 1),
    }


async def measure(daemon: Server, args: argparse.Namespace) -> dict[str, Any]:
    await harness.load_ready(daemon.stub, MODEL, REPLICAS)
    progress("the keys' homes")
    home = await homes(daemon.stub)
    share = Counter(home.values())
    results: dict[str, Any] = {
        "homes": {"keys": len(KEYS), "per_replica": sorted(share.values())},
        "hits": [],
        "cost": [],
    }
    for concurrency in args.concurrency:
        progress(f"hit rate at concurrency {concurrency}")
        results["hits"].append(await hit_rate(daemon.stub, home, concurrency, args.seconds))
        progress(f"Route cost with and without a key at concurrency {concurrency}")
        results["cost"].append(await route_cost(daemon, concurrency, args.seconds))
    results["pure_pick"] = pure_pick()
    return results


def targets(results: dict[str, Any]) -> list[Target]:
    if "error" in results.get("measure", {}):
        return []
    m = results["measure"]
    out = []
    least = min(m["homes"]["per_replica"]) / m["homes"]["keys"]
    out.append(Target("least replica's share of keys", least, ">= 0.2", least >= 0.2))
    for h in m["hits"]:
        c = h["concurrency"]
        goal, ok = (">= 0.99", h["hit_rate"] >= 0.99) if c == 1 else ("report", True)
        out.append(Target(f"hit rate, concurrency {c}", h["hit_rate"], goal, ok))
        spread = h["spread_max_over_mean"]
        out.append(Target(f"spread max/mean, c={c}", spread, "<= 1.5", spread <= 1.5))
    for cost in m["cost"]:
        # Two closed loops on a shared machine: reported, judged by the share below.
        ratio = cost["keyed_over_plain"]
        out.append(Target(f"keyed/plain pairs/s, c={cost['concurrency']}", ratio, "report", True))
    share = pick_share(m)
    out.append(Target("keyed pick's extra / Route+Release p50", share, "<= 0.02", share <= 0.02))
    return out


def pick_share(m: dict[str, Any]) -> float:
    """What a key adds to the pure pick, over a whole Route+Release at concurrency 1."""
    plain = next(s for c in m["cost"] for s in c["series"] if s["kind"] == "plain")
    extra_us = m["pure_pick"]["keyed_us"] - m["pure_pick"]["plain_us"]
    return round(max(extra_us, 0.0) / (plain["p50_ms"] * 1000), 4)


def render(results: dict[str, Any], checks: list[Target]) -> str:
    m = results.get("measure", {})
    if "error" in m:
        return f"{TOOL}: {m['error']}"
    lines = [f"Affinity: {REPLICAS} replicas, {len(KEYS)} keys; homes {m['homes']['per_replica']}"]
    for h in m["hits"]:
        lines.append(
            f"  c={h['concurrency']:<3} routes {h['routes']:>6}  hit rate {h['hit_rate']:.3f}  "
            f"max/mean {h['spread_max_over_mean']:.3f}  per replica {h['per_replica']}"
        )
    for cost in m["cost"]:
        rates = {s["kind"]: s for s in cost["series"]}
        lines.append(
            f"  c={cost['concurrency']:<3} keyed {rates['keyed']['pairs_per_s']:>8} pairs/s "
            f"(p50 {rates['keyed']['p50_ms']} ms)  plain {rates['plain']['pairs_per_s']:>8} "
            f"pairs/s (p50 {rates['plain']['p50_ms']} ms)  ratio {cost['keyed_over_plain']}"
        )
    p = m["pure_pick"]
    lines.append(
        f"  pure pick: {p['plain_us']} us plain, {p['keyed_us']} us keyed "
        f"(x{p['keyed_over_plain']}); ring build {p['ring_build_us']} us"
    )
    return "\n".join(lines + harness.targets_table(checks))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    log = args.out.parent / "affinity-modeld.log"
    async with harness.daemon_serving(TOOL, CONFIG, log) as daemon:
        started = time.perf_counter()
        results = {"measure": await harness.section(TOOL, "measure", measure(daemon, args))}
        results["setup"] = {
            "seconds_per_figure": args.seconds,
            "slices": SLICES,
            "measured_s": round(time.perf_counter() - started, 1),
        }
        return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return harness.bench_main(TOOL, args.out, lambda: run(args), targets, render)


if __name__ == "__main__":
    sys.exit(main())
