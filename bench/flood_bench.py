"""Hot-path isolation benchmark (part of `make bench`): a measurement, not a test.

Route+Release on a quiet model, CLIENTS closed-loop clients, under three conditions
on one daemon, in ABC-CBA order so drift hits all three alike:

- quiet: no other model loaded;
- chatty: a second model whose echo backend prints `--rate` lines/s (`--chatty`);
- flood: the chatty model plus FOLLOWERS `StreamLogs follow` streams on it that
  never read (a dashboard left open on a tab nobody looks at).

Also the daemon's RSS: idle (quiet model loaded), and once the chatty model has
written 100k more lines with the stalled followers attached.

The stalled followers run in a process of their own (bench/stalled_followers.py),
as dashboards would, so that receiving their lines is not charged to the timed
clients.

Output: a table with the targets and bench/results/flood_bench.json (`harness.bench_main`).
"""

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable
from typing import Any

import harness
from harness import (
    CALL_LIMIT_S,
    HERE,
    BenchError,
    Series,
    Server,
    Target,
    route_pair,
    rss_mib,
    warm_up,
)
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc

TOOL = "flood_bench"
QUIET, CHATTY = "quiet", "chatty"
CONDITIONS = ("quiet", "chatty", "flood")
BURST_LINES = 100_000
WARM_UP_S = 0.5
RSS_GROWTH_LIMIT_MIB = 20.0
CONFIG = (
    harness.ECHO_BACKEND
    + """
[backends.chatty]
command = ["{{python}}", "-m", "modeld.backends.echo", "--addr", "{{addr}}", "--chatty", "{rate}"]

[models.quiet]
backend = "echo"

[models.chatty]
backend = "chatty"
"""
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.arguments(__doc__, "flood_bench.json", 5.0, "condition")
    parser.add_argument("--clients", type=int, default=4, help="Route+Release clients (4)")
    parser.add_argument("--rate", type=int, default=50_000, help="chatty lines/s (50000)")
    parser.add_argument("--followers", type=int, default=200, help="stalled followers (200)")
    return parser.parse_args(argv)


def progress(text: str) -> None:
    harness.progress(TOOL, text)


def section(name: str, work: Awaitable[dict[str, Any]]) -> Awaitable[dict[str, Any]]:
    return harness.section(TOOL, name, work)


class Followers:
    """FOLLOWERS stalled `StreamLogs follow` clients (bench/stalled_followers.py)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    @classmethod
    async def start(cls, addr: str, model: str, n: int) -> "Followers":
        script = str(HERE / "stalled_followers.py")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            script,
            addr,
            model,
            str(n),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        async with asyncio.timeout(CALL_LIMIT_S):
            ready = await proc.stdout.readline()
        if ready != b"ready\n":
            raise BenchError(f"stalled followers did not start (exit {await proc.wait()})")
        return cls(proc)

    async def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), CALL_LIMIT_S)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()


async def unload(stub: pb_grpc.ModelControlStub, model: str) -> None:
    await stub.Unload(pb.UnloadRequest(model=model, force=True), timeout=CALL_LIMIT_S)


async def enter(daemon: Server, condition: str, followers: int) -> Followers | None:
    """Set up `condition` from quiet; returns the followers to close when leaving it."""
    if condition == "quiet":
        return None
    await harness.load_ready(daemon.stub, CHATTY)
    if condition == "chatty":
        return None
    return await Followers.start(daemon.addr, CHATTY, followers)


async def leave(daemon: Server, condition: str, stalled: Followers | None) -> None:
    if stalled is not None:
        await stalled.close()
    if condition != "quiet":
        await unload(daemon.stub, CHATTY)


async def conditions(daemon: Server, args: argparse.Namespace) -> dict[str, Any]:
    pair = route_pair(daemon.stub, QUIET)
    series = {c: Series(c, args.clients) for c in CONDITIONS}
    for condition in (*CONDITIONS, *reversed(CONDITIONS)):
        progress(f"{condition}: {args.seconds / 2:.1f} s of Route+Release")
        stalled = await enter(daemon, condition, args.followers)
        try:
            await warm_up(pair, args.clients, WARM_UP_S)
            await series[condition].run(pair, args.seconds / 2)
        finally:
            await leave(daemon, condition, stalled)
    summaries = {c: s.summary() for c, s in series.items()}
    quiet = summaries["quiet"]
    ratios = {
        f"{c}_over_quiet": {
            "p99": round(summaries[c]["p99_ms"] / quiet["p99_ms"], 3),
            "pairs_per_s": round(summaries[c]["pairs_per_s"] / quiet["pairs_per_s"], 3),
        }
        for c in ("chatty", "flood")
    }
    return {"series": summaries, "ratios": ratios}


async def chatty_line(stub: pb_grpc.ModelControlStub, at_least: int = 0) -> int:
    """The number of a chatty line >= `at_least`, as a live follower sees it."""
    stream = stub.StreamLogs(pb.StreamLogsRequest(model=CHATTY, follow=True))
    try:
        async with asyncio.timeout(CALL_LIMIT_S * 4):
            async for line in stream:
                number = line.text.removeprefix("chatty line ")
                if line.stream == "stdout" and number.isdigit() and int(number) >= at_least:
                    return int(number)
    finally:
        stream.cancel()
    raise BenchError(f"the {CHATTY} log stream ended")


async def memory(daemon: Server, args: argparse.Namespace) -> dict[str, Any]:
    progress(f"RSS: {BURST_LINES} lines with {args.followers} stalled followers")
    idle = rss_mib(daemon.proc.pid)
    await harness.load_ready(daemon.stub, CHATTY)
    try:
        stalled = await Followers.start(daemon.addr, CHATTY, args.followers)
        try:
            first = await chatty_line(daemon.stub)
            await chatty_line(daemon.stub, at_least=first + BURST_LINES)
            flooded = rss_mib(daemon.proc.pid)
        finally:
            await stalled.close()
    finally:
        await unload(daemon.stub, CHATTY)
    return {
        "idle_mib": round(idle, 1),
        "flooded_mib": round(flooded, 1),
        "growth_mib": round(flooded - idle, 1),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    log = args.out.parent / "flood_daemon.log"
    async with harness.daemon_serving(TOOL, CONFIG, log, rate=args.rate) as daemon:
        await harness.load_ready(daemon.stub, QUIET)
        await warm_up(route_pair(daemon.stub, QUIET), args.clients, WARM_UP_S)
        results: dict[str, Any] = {"setup": setup(args)}
        # Memory first: its idle figure must not include what the other phases left.
        results["memory"] = await section("memory", memory(daemon, args))
        results["conditions"] = await section("conditions", conditions(daemon, args))
        return results


def setup(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "seconds_per_condition": args.seconds,
        "clients": args.clients,
        "chatty_lines_per_s": args.rate,
        "followers": args.followers,
        "burst_lines": BURST_LINES,
    }


def targets(results: dict[str, Any]) -> list[Target]:
    ratios = results["conditions"].get("ratios", {})
    growth = results["memory"].get("growth_mib")

    def check(name: str, value: float | None, goal: str, ok: bool) -> Target:
        return Target(name, value, goal, value is not None and ok)

    chatty = ratios.get("chatty_over_quiet", {})
    flood = ratios.get("flood_over_quiet", {})
    return [
        check("chatty/quiet p99", chatty.get("p99"), "<= 1.2", (chatty.get("p99") or 9) <= 1.2),
        check("flood/quiet p99", flood.get("p99"), "<= 2.0", (flood.get("p99") or 9) <= 2.0),
        check(
            "flood/quiet pairs/s",
            flood.get("pairs_per_s"),
            ">= 0.7",
            (flood.get("pairs_per_s") or 0) >= 0.7,
        ),
        check("RSS growth MiB", growth, f"<= {RSS_GROWTH_LIMIT_MIB:g}", (growth or 99) <= 20),
    ]


def render(results: dict[str, Any], checks: list[Target]) -> str:
    s = results["setup"]
    lines = [
        f"modeld hot-path isolation: {s['cpus']} CPUs, {s['clients']} Route+Release clients, "
        f"{s['seconds_per_condition']} s per condition (ABC-CBA), chatty {s['chatty_lines_per_s']}"
        f" lines/s, {s['followers']} stalled followers",
        f"  {'condition':<10}{'pairs':>8}{'pairs/s':>10}{'p50 ms':>9}{'p99 ms':>9}",
    ]
    for name, row in results["conditions"].get("series", {}).items():
        lines.append(
            f"  {name:<10}{row['pairs']:>8}{row['pairs_per_s']:>10.1f}"
            f"{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}"
        )
    mem = results["memory"]
    if "error" not in mem:
        lines.append(
            f"  RSS idle {mem['idle_mib']} MiB, after {s['burst_lines']} chatty lines with "
            f"{s['followers']} stalled followers {mem['flooded_mib']} MiB"
        )
    for key in ("conditions", "memory"):
        if "error" in results[key]:
            lines.append(f"  {key}: ERROR {results[key]['error']}")
    return "\n".join(lines + harness.targets_table(checks, 30))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return harness.bench_main(TOOL, args.out, lambda: run(args), targets, render)


if __name__ == "__main__":
    sys.exit(main())
