"""Latency figures that used to be wall-clock asserts in the tests (`make bench`).

The tests now assert order and outcome; how fast is measured here, on a daemon
of its own, each figure next to a baseline taken in the same run:

1. crash → FAILED: from SIGKILL of a READY backend until its FAILED event
   arrives on WatchEvents (no request in between: the exit watch alone notices);
2. Health while a backend floods its output past a follower that reads nothing,
   against Health on the same daemon before the flood;
3. Ping with 200 stalled followers (half StreamLogs of a flooding model, half
   WatchEvents) against Ping before they were opened.

`route_bench.py` runs `measure()` as one section of its report; run alone with
`python bench/latency_figures.py` for just these.
"""

import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
import uvloop

import harness
from harness import CALL_LIMIT_S, EventWatch, Server, latency_summary
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc

TOOL = "latency_figures"
SAMPLES = 200
# While a disturbance lasts until some condition, calls are timed in batches this big.
BATCH = 10
CRASHES = 3
FLOOD_LINES = 100_000
FOLLOWERS = 200
CONFIG = (
    """
[logs]
subscriber_queue = 100
"""
    + harness.ECHO_BACKEND
    + """stop_grace = "1s"

[backends.flood]
command = ["{{python}}", "-m", "modeld.backends.echo", "--addr", "{{addr}}", "--flood", "{lines}"]
stop_grace = "1s"
[models.echo]
backend = "echo"
max_replicas = {crashes}
[models.flood]
backend = "flood"
[models.chatty]
backend = "flood"
"""
)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


async def _timed(call: Callable[[], Awaitable[Any]], samples: int) -> list[float]:
    took = []
    for _ in range(samples):
        started = time.perf_counter()
        await call()
        took.append(time.perf_counter() - started)
    return took


async def before_and_during(
    call: Callable[[], Awaitable[Any]],
    disturbance: AbstractAsyncContextManager[None],
    until: Callable[[], Awaitable[bool]] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """`call` timed SAMPLES times alone, then while `disturbance` lasts: SAMPLES times,
    or (given `until`) in batches until `until()` holds. The one measurement loop of
    every figure here that has a baseline."""
    before = await _timed(call, SAMPLES)
    async with disturbance, asyncio.timeout(120):
        during = await _timed(call, SAMPLES if until is None else BATCH)
        while until is not None and not await until():
            during += await _timed(call, BATCH)
    return latency_summary(before), latency_summary(during)


async def crash_to_failed(stub: pb_grpc.ModelControlStub) -> dict[str, Any]:
    watch = EventWatch(stub, "echo")
    try:
        replicas = await harness.load_ready(stub, "echo", CRASHES, limit_s=60)
        took = []
        for replica in replicas:
            started = time.perf_counter()
            os.kill(replica.pid, signal.SIGKILL)
            await watch.wait({replica.id}, {pb.FAILED})
            took.append(time.perf_counter() - started)
    finally:
        await watch.close()
    return {
        "crashes": len(took),
        "median_ms": _ms(statistics.median(took)),
        "max_ms": _ms(max(took)),
    }


async def _tail(stub: pb_grpc.ModelControlStub, model: str) -> str:
    lines = [ln.text async for ln in stub.StreamLogs(pb.StreamLogsRequest(model=model, tail=5))]
    stdout = [t for t in lines if t.startswith("flood line")]
    return stdout[-1] if stdout else ""


@contextlib.asynccontextmanager
async def _flood_with_a_stalled_follower(stub: pb_grpc.ModelControlStub) -> AsyncIterator[None]:
    stalled = stub.StreamLogs(pb.StreamLogsRequest(model="flood", follow=True))
    try:
        await stub.Load(pb.LoadRequest(model="flood"), timeout=60)
        yield
    finally:
        stalled.cancel()


async def health_during_flood(stub: pb_grpc.ModelControlStub) -> dict[str, Any]:
    last = f"flood line {FLOOD_LINES - 1}"

    async def flood_written() -> bool:
        return await _tail(stub, "flood") == last

    before, during = await before_and_during(
        lambda: stub.Health(pb.HealthRequest(), timeout=CALL_LIMIT_S),
        _flood_with_a_stalled_follower(stub),
        until=flood_written,
    )
    worst_ratio = during["max_ms"] / max(before["p99_ms"], 1e-3)
    return {"before": before, "during": during, "worst_over_before_p99": round(worst_ratio, 2)}


@contextlib.asynccontextmanager
async def _stalled_followers(server: Server) -> AsyncIterator[None]:
    """FOLLOWERS streams on a channel of their own that never read: half StreamLogs of
    a chatty model (loaded here), half WatchEvents."""
    quiet = grpc.aio.insecure_channel(server.addr)
    try:
        quiet_stub = pb_grpc.ModelControlStub(quiet)  # type: ignore[no-untyped-call]
        stalled = [
            quiet_stub.StreamLogs(pb.StreamLogsRequest(model="chatty", follow=True))
            if i % 2
            else quiet_stub.WatchEvents(pb.WatchEventsRequest())
            for i in range(FOLLOWERS)
        ]
        await server.stub.Load(pb.LoadRequest(model="chatty"), timeout=60)
        yield
        for call in stalled:
            call.cancel()
    finally:
        await quiet.close(None)


async def ping_with_stalled_followers(server: Server) -> dict[str, Any]:
    stub = server.stub
    before, with_them = await before_and_during(
        lambda: stub.Ping(pb.PingRequest(), timeout=CALL_LIMIT_S), _stalled_followers(server)
    )
    return {
        "followers": FOLLOWERS,
        "before": before,
        "with_stalled": with_them,
        "p99_ratio": round(with_them["p99_ms"] / max(before["p99_ms"], 1e-3), 2),
    }


async def measure() -> dict[str, Any]:
    """Every figure, on a daemon started (and stopped) for them alone."""
    async with harness.daemon_serving(TOOL, CONFIG, lines=FLOOD_LINES, crashes=CRASHES) as server:
        return {
            "crash_to_failed": await _section("crash", crash_to_failed(server.stub)),
            "health_during_flood": await _section("flood", health_during_flood(server.stub)),
            "ping_with_stalled_followers": await _section(
                "stalled", ping_with_stalled_followers(server)
            ),
        }


def _section(name: str, work: Awaitable[dict[str, Any]]) -> Awaitable[dict[str, Any]]:
    return harness.section(TOOL, name, work)


def render(section: dict[str, Any]) -> list[str]:
    figures = [
        ("crash → FAILED event", section.get("crash_to_failed", {}), _crash_line),
        ("Health during an output flood", section.get("health_during_flood", {}), _flood_line),
        (
            "Ping with stalled followers",
            section.get("ping_with_stalled_followers", {}),
            _pings_line,
        ),
    ]
    return [
        f"{label}: ERROR {figure['error']}" if "error" in figure else line(figure)
        for label, figure, line in figures
        if figure
    ]


def _crash_line(crash: dict[str, Any]) -> str:
    return (
        f"crash → FAILED event: median {crash['median_ms']} ms, "
        f"max {crash['max_ms']} ms over {crash['crashes']} crashes"
    )


def _flood_line(flood: dict[str, Any]) -> str:
    return (
        f"Health during an output flood: p99 {flood['during']['p99_ms']} ms, "
        f"worst {flood['during']['max_ms']} ms (before: p99 {flood['before']['p99_ms']} ms); "
        f"worst/before-p99 {flood['worst_over_before_p99']}x"
    )


def _pings_line(pings: dict[str, Any]) -> str:
    return (
        f"Ping with {pings['followers']} stalled followers: "
        f"p50/p99 {pings['with_stalled']['p50_ms']}/{pings['with_stalled']['p99_ms']} ms "
        f"(before {pings['before']['p50_ms']}/{pings['before']['p99_ms']} ms); "
        f"p99 ratio {pings['p99_ratio']}x"
    )


def main() -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        section = runner.run(measure())
    print("\n".join(render(section)))
    print(json.dumps(section, indent=2))
    return 1 if any("error" in v for v in section.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
