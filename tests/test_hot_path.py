"""The real daemon under a log flood: followers that stop reading cost bounded memory,
and a follower that reads gets the flood in order, with a count of what it lost (it
must lose some: streams together send a bounded number of lines per second)."""

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from daemon_proc import ECHO_CATALOG, DaemonProc, running_daemon
from faults import echo_backend_toml, new_marker, rss_kib
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc

STALLED = 200
FLOOD_LINES = 100_000
RSS_GROWTH_LIMIT_KIB = 20 * 1024
LINE = re.compile(r"^chatty line (\d+)$")
DROPPED = re.compile(r"^\[modeld\] (\d+) lines dropped: subscriber too slow$")


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[DaemonProc]:
    body = ECHO_CATALOG + echo_backend_toml("chatty", new_marker(), "--chatty", "1e9")
    async with running_daemon(tmp_path, body + '[models.chatty]\nbackend = "chatty"\n') as d:
        yield d


def _number(line: pb.LogLine) -> int | None:
    match = LINE.match(line.text)
    return int(match[1]) if match and line.stream == "stdout" else None


async def _stalled_followers(channel: grpc.aio.Channel) -> list[Any]:
    """STALLED followers of the chatty model that each read one line, then stop."""
    stub = pb_grpc.ModelControlStub(channel)  # type: ignore[no-untyped-call]
    calls = [
        stub.StreamLogs(pb.StreamLogsRequest(model="chatty", follow=True)) for _ in range(STALLED)
    ]
    for call in calls:
        assert _number(await call.read()) is not None
    return calls


async def test_a_reading_follower_gets_the_flood_in_order_with_counted_gaps(
    daemon: DaemonProc,
) -> None:
    await daemon.stub.Load(pb.LoadRequest(model="chatty"), timeout=30)
    follower = daemon.stub.StreamLogs(pb.StreamLogsRequest(model="chatty", follow=True))
    previous: int | None = None
    lost = markers = lines = 0
    try:
        async with asyncio.timeout(60):
            async for line in follower:
                if (match := DROPPED.match(line.text)) and line.stream == "modeld":
                    lost += int(match[1])
                    markers += 1
                    continue
                number = _number(line)
                assert number is not None, line
                assert previous is None or number == previous + 1 + lost, (previous, lost, line)
                previous, lost, lines = number, 0, lines + 1
                if lines >= 5_000 and markers >= 2:
                    break
    finally:
        follower.cancel()
    print(f"\n{lines} lines in order, {markers} drop markers, up to chatty line {previous}")


async def test_stalled_followers_and_a_flood_keep_the_daemon_within_20_mib(
    daemon: DaemonProc,
) -> None:
    stub = daemon.stub
    # The first load and unload bring in what any load needs; that is not the flood's.
    await stub.Load(pb.LoadRequest(model="echo"), timeout=30)
    await stub.Unload(pb.UnloadRequest(model="echo"), timeout=30)
    idle = rss_kib(daemon.proc.pid)
    # Dashboards are other clients, on connections of their own.
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(daemon.addr, options=options) as channel:
        await stub.Load(pb.LoadRequest(model="chatty"), timeout=30)
        await _stalled_followers(channel)
        first = await _next_number(stub)
        flooded_until = await _next_number(stub, at_least=first + FLOOD_LINES)
        flooded = rss_kib(daemon.proc.pid)
        await stub.Unload(pb.UnloadRequest(model="chatty"), timeout=30)
    growth = flooded - idle
    print(
        f"\ndaemon RSS idle {idle / 1024:.1f} MiB, {flooded / 1024:.1f} MiB after "
        f"{flooded_until - first} lines with {STALLED} stalled followers (+{growth / 1024:.1f})"
    )
    assert growth < RSS_GROWTH_LIMIT_KIB, f"RSS grew {growth} KiB"


async def _next_number(stub: pb_grpc.ModelControlStub, at_least: int = 0) -> int:
    """The number of a chatty line at least `at_least`, as a live follower sees it."""
    follower = stub.StreamLogs(pb.StreamLogsRequest(model="chatty", follow=True))
    try:
        async with asyncio.timeout(60):
            async for line in follower:
                number = _number(line)
                if number is not None and number >= at_least:
                    return number
    finally:
        follower.cancel()
    raise AssertionError("the chatty model's log stream ended")
