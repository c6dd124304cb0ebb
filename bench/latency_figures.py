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
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import uvloop

from harness import CALL_LIMIT_S, BenchError, Command, EventWatch, Server, free_port, spawn_all
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc

SAMPLES = 200
CRASHES = 3
FLOOD_LINES = 100_000
FOLLOWERS = 200
CONFIG = """listen = ["{addr}"]
state_dir = "{state}"
models_dir = "{models}"
log_level = "warning"
shutdown_grace = "5s"
[logs]
subscriber_queue = 100
[backends.echo]
command = ["{{python}}", "-m", "modeld.backends.echo", "--addr", "{{addr}}"]
stop_grace = "1s"
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


def _command(tmp: Path) -> Command:
    addr = f"127.0.0.1:{free_port()}"
    (tmp / "models").mkdir(exist_ok=True)
    config = tmp / "latency.toml"
    config.write_text(
        CONFIG.format(
            addr=addr,
            state=tmp / "state",
            models=tmp / "models",
            lines=FLOOD_LINES,
            crashes=CRASHES,
        )
    )
    argv = [sys.executable, "-m", "modeld.cli.main", "serve", "--config", str(config)]
    return Command("modeld (latency)", argv, addr, tmp / "latency-modeld.log")


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


async def _timed(call: Callable[[], Awaitable[Any]], samples: int = SAMPLES) -> list[float]:
    took = []
    for _ in range(samples):
        started = time.perf_counter()
        await call()
        took.append(time.perf_counter() - started)
    return took


def _summary(took: list[float]) -> dict[str, float]:
    ordered = sorted(took)
    return {
        "p50_ms": _ms(statistics.median(ordered)),
        "p99_ms": _ms(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]),
        "max_ms": _ms(ordered[-1]),
        "samples": len(ordered),
    }


async def crash_to_failed(stub: pb_grpc.ModelControlStub) -> dict[str, Any]:
    watch = EventWatch(stub, "echo")
    try:
        loaded = await stub.Load(pb.LoadRequest(model="echo", replicas=CRASHES), timeout=60)
        replicas = [r for r in loaded.replicas if r.state == pb.READY]
        if len(replicas) < CRASHES:
            raise BenchError(f"Load gave {len(replicas)} READY echo replicas, wanted {CRASHES}")
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


async def health_during_flood(stub: pb_grpc.ModelControlStub) -> dict[str, Any]:
    health = lambda: stub.Health(pb.HealthRequest(), timeout=CALL_LIMIT_S)  # noqa: E731
    before = await _timed(health)
    stalled = stub.StreamLogs(pb.StreamLogsRequest(model="flood", follow=True))
    try:
        await stub.Load(pb.LoadRequest(model="flood"), timeout=60)
        last = f"flood line {FLOOD_LINES - 1}"
        during: list[float] = []
        async with asyncio.timeout(120):
            while await _tail(stub, "flood") != last:
                during += await _timed(health, 10)
    finally:
        stalled.cancel()
    summary = {"before": _summary(before), "during": _summary(during)}
    worst_ratio = summary["during"]["max_ms"] / max(summary["before"]["p99_ms"], 1e-3)
    return {**summary, "worst_over_before_p99": round(worst_ratio, 2)}


async def ping_with_stalled_followers(server: Server) -> dict[str, Any]:
    stub = server.stub
    ping = lambda: stub.Ping(pb.PingRequest(), timeout=CALL_LIMIT_S)  # noqa: E731
    before = _summary(await _timed(ping))
    quiet = grpc.aio.insecure_channel(server.addr)
    try:
        quiet_stub = pb_grpc.ModelControlStub(quiet)  # type: ignore[no-untyped-call]
        stalled = [
            quiet_stub.StreamLogs(pb.StreamLogsRequest(model="chatty", follow=True))
            if i % 2
            else quiet_stub.WatchEvents(pb.WatchEventsRequest())
            for i in range(FOLLOWERS)
        ]
        await stub.Load(pb.LoadRequest(model="chatty"), timeout=60)
        with_them = _summary(await _timed(ping))
        for call in stalled:
            call.cancel()
    finally:
        await quiet.close(None)
    return {
        "followers": FOLLOWERS,
        "before": before,
        "with_stalled": with_them,
        "p99_ratio": round(with_them["p99_ms"] / max(before["p99_ms"], 1e-3), 2),
    }


async def _section(work: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    try:
        return await work
    except grpc.aio.AioRpcError as exc:
        return {"error": f"{exc.code().name}: {exc.details()}"}
    except (BenchError, TimeoutError) as exc:
        return {"error": str(exc) or type(exc).__name__}


async def measure() -> dict[str, Any]:
    """Every figure, on a daemon started (and stopped) for them alone."""
    with tempfile.TemporaryDirectory(prefix="modeld-latency-") as tmp:
        [server] = await spawn_all([_command(Path(tmp))])
        try:
            await server.wait_serving()
            return {
                "crash_to_failed": await _section(crash_to_failed(server.stub)),
                "health_during_flood": await _section(health_during_flood(server.stub)),
                "ping_with_stalled_followers": await _section(ping_with_stalled_followers(server)),
            }
        finally:
            await server.stop()


def render(section: dict[str, Any]) -> list[str]:
    lines = []
    crash = section.get("crash_to_failed", {})
    if "error" in crash:
        lines.append(f"crash → FAILED event: ERROR {crash['error']}")
    elif crash:
        lines.append(
            f"crash → FAILED event: median {crash['median_ms']} ms, "
            f"max {crash['max_ms']} ms over {crash['crashes']} crashes"
        )
    flood = section.get("health_during_flood", {})
    if "error" in flood:
        lines.append(f"Health during an output flood: ERROR {flood['error']}")
    elif flood:
        lines.append(
            f"Health during an output flood: p99 {flood['during']['p99_ms']} ms, "
            f"worst {flood['during']['max_ms']} ms (before: p99 {flood['before']['p99_ms']} ms); "
            f"worst/before-p99 {flood['worst_over_before_p99']}x"
        )
    pings = section.get("ping_with_stalled_followers", {})
    if "error" in pings:
        lines.append(f"Ping with stalled followers: ERROR {pings['error']}")
    elif pings:
        lines.append(
            f"Ping with {pings['followers']} stalled followers: "
            f"p50/p99 {pings['with_stalled']['p50_ms']}/{pings['with_stalled']['p99_ms']} ms "
            f"(before {pings['before']['p50_ms']}/{pings['before']['p99_ms']} ms); "
            f"p99 ratio {pings['p99_ratio']}x"
        )
    return lines


def main() -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        section = runner.run(measure())
    print("\n".join(render(section)))
    print(json.dumps(section, indent=2))
    return 1 if any("error" in v for v in section.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
