"""Clients that misbehave against the real daemon: slots leak only until lease expiry,
and followers that stop reading cost bounded memory and slow nobody down.

Figures (leases expired, RSS before/after, Ping/Route latency with and without
200 stalled streams) are printed; run with `-s` to see them.
"""

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from daemon_proc import DaemonProc, running_daemon
from faults import echo_backend_toml, new_marker, rss_kib
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc

CLIENTS = 1000
CHANNELS = 10
SUBSCRIBERS = 200
FLOOD_LINES = 30_000
# Expired leases: more events than a watcher's queue (1024) holds.
EVENT_FLOOD = 2000
# What 200 stalled followers may add to the daemon's resident memory.
RSS_GROWTH_LIMIT_KIB = 32 * 1024
LATENCY_SAMPLES = 200


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[DaemonProc]:
    marker = new_marker()
    body = (
        echo_backend_toml("echo", marker)
        + echo_backend_toml("flood", marker, "--flood", str(FLOOD_LINES))
        + '[models.m]\nbackend = "echo"\nlease_ttl = "1s"\n'
        + '[models.chatty]\nbackend = "flood"\n'
    )
    async with running_daemon(tmp_path, body) as d:
        yield d


async def _wait_expired(events: AsyncIterator[pb.Event], count: int) -> int:
    seen = 0
    async for event in events:
        if event.reason == "lease_expired":
            seen += 1
            if seen >= count:
                break
    return seen


async def _route_and_vanish(addr: str, routes: int) -> int:
    """One client connection: `routes` Routes, no Release, then it just goes away."""
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.ModelControlStub(channel)  # type: ignore[no-untyped-call]
        replies = await asyncio.gather(
            *(stub.Route(pb.RouteRequest(model="m"), timeout=20) for _ in range(routes)), return_exceptions=True
        )
    errs = [r for r in replies if isinstance(r, BaseException)]
    if errs:
        print("ERRS", len(errs), repr(errs[0].debug_error_string()), errs[0].details())
    return len({r.lease_id for r in replies if not isinstance(r, BaseException)})


async def test_leases_of_vanished_clients_come_back_at_expiry(daemon: DaemonProc) -> None:
    await daemon.stub.Load(pb.LoadRequest(model="m"), timeout=30)
    watch = daemon.stub.WatchEvents(pb.WatchEventsRequest(model="m"))
    expired = asyncio.ensure_future(_wait_expired(watch.__aiter__(), CLIENTS))
    started = time.monotonic()
    granted = await asyncio.gather(
        *(_route_and_vanish(daemon.addr, CLIENTS // CHANNELS) for _ in range(CHANNELS))
    )
    routed_s = time.monotonic() - started
    assert sum(granted) == CLIENTS
    assert await asyncio.wait_for(expired, 20) == CLIENTS
    back_s = time.monotonic() - started
    watch.cancel()
    replicas = (await daemon.stub.ListReplicas(pb.ListReplicasRequest(model="m"))).replicas
    assert [r.in_flight for r in replicas if r.state == pb.READY] == [0]
    lease = await daemon.stub.Route(pb.RouteRequest(model="m"), timeout=5)
    assert (await daemon.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id))).released
    print(
        f"\n{CLIENTS} leases over {CHANNELS} vanished connections: routed in {routed_s:.2f}s, "
        f"all expired and in_flight 0 after {back_s:.2f}s (lease_ttl 1s)"
    )


async def _latencies(call: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    samples = []
    for _ in range(LATENCY_SAMPLES):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


async def _route_release(stub: pb_grpc.ModelControlStub) -> None:
    lease = await stub.Route(pb.RouteRequest(model="m"), timeout=5)
    await stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id))


async def _tail_has(stub: pb_grpc.ModelControlStub, text: str) -> bool:
    request = pb.StreamLogsRequest(model="chatty", tail=5)
    return text in [line.text async for line in stub.StreamLogs(request)]


async def _follow_until(stub: pb_grpc.ModelControlStub, text: str) -> None:
    """Follow the model's output until `text` was written (seen live, or in the ring
    when this follower itself lost it: it then gets a "lines dropped" note)."""
    stream = stub.StreamLogs(pb.StreamLogsRequest(model="chatty", follow=True))
    try:
        async for line in stream:
            if line.text == text:
                return
            if line.stream == "modeld" and "dropped" in line.text and await _tail_has(stub, text):
                return
    finally:
        stream.cancel()


async def test_stalled_and_many_followers_cost_bounded_memory(daemon: DaemonProc) -> None:
    stub = daemon.stub
    await stub.Load(pb.LoadRequest(model="m"), timeout=30)
    ping_before = await _latencies(lambda: stub.Ping(pb.PingRequest(), timeout=5))
    route_before = await _latencies(lambda: _route_release(stub))
    rss_before = rss_kib(daemon.proc.pid)

    # Followers that never read: their streams stall on HTTP/2 flow control, and
    # the daemon's queue for each fills up and then drops.
    stalled = [
        stub.StreamLogs(pb.StreamLogsRequest(model="chatty", follow=True))
        if i % 2
        else stub.WatchEvents(pb.WatchEventsRequest())
        for i in range(SUBSCRIBERS)
    ]
    reader = asyncio.ensure_future(_follow_until(stub, f"flood line {FLOOD_LINES - 1}"))
    watch = stub.WatchEvents(pb.WatchEventsRequest(model="m"))
    expired = asyncio.ensure_future(_wait_expired(watch.__aiter__(), EVENT_FLOOD))
    await stub.Load(pb.LoadRequest(model="chatty"), timeout=30)
    # Every lease that expires is an event for each of the 100 stalled watchers.
    await asyncio.gather(
        *(_route_and_vanish(daemon.addr, EVENT_FLOOD // CHANNELS) for _ in range(CHANNELS))
    )
    # The backend's pipe is drained, and expiry goes on, while 200 streams read nothing.
    await asyncio.wait_for(reader, 60)
    assert await asyncio.wait_for(expired, 30) == EVENT_FLOOD
    watch.cancel()
    ping_during = await _latencies(lambda: stub.Ping(pb.PingRequest(), timeout=5))
    route_during = await _latencies(lambda: _route_release(stub))
    rss_during = rss_kib(daemon.proc.pid)
    for call in stalled:
        call.cancel()
    assert (await stub.Ping(pb.PingRequest(), timeout=5)) == pb.PingResponse()

    growth = rss_during - rss_before
    print(
        f"\n{SUBSCRIBERS} stalled followers, {FLOOD_LINES} lines and {EVENT_FLOOD} events "
        f"flooded: daemon RSS {rss_before / 1024:.1f} -> {rss_during / 1024:.1f} MiB "
        f"(+{growth / 1024:.1f} MiB)\n"
        f"Ping p50/p99 ms: {ping_before[0]:.2f}/{ping_before[1]:.2f} before, "
        f"{ping_during[0]:.2f}/{ping_during[1]:.2f} with them\n"
        f"Route+Release p50/p99 ms: {route_before[0]:.2f}/{route_before[1]:.2f} before, "
        f"{route_during[0]:.2f}/{route_during[1]:.2f} with them"
    )
    assert growth < RSS_GROWTH_LIMIT_KIB, f"RSS grew {growth} KiB"
    assert ping_during[1] < max(10 * ping_before[1], 50.0)
    assert route_during[1] < max(10 * route_before[1], 50.0)
