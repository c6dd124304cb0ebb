"""The systemd notify protocol against a datagram socket the test owns."""

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from modeld.clock import FakeClock
from modeld.ops.notify import Notifier, ping_due, socket_address, watchdog_interval

WAIT = 5.0


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.setblocking(False)
    yield sock, str(path)
    sock.close()


async def receive(sock: socket.socket) -> str:
    data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), WAIT)
    return data.decode()


async def test_messages_reach_the_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier(path)
    notifier.ready()
    notifier.status("2 ready\n1 loading")
    notifier.stopping()
    received = [await receive(sock) for _ in range(3)]
    notifier.close()
    assert received == ["READY=1", "STATUS=2 ready 1 loading", "STOPPING=1"]


async def test_abstract_socket() -> None:
    name = f"modeld-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.setblocking(False)
    try:
        notifier = Notifier("@" + name)
        notifier.ready()
        assert await receive(sock) == "READY=1"
        notifier.close()
    finally:
        sock.close()


async def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier(None, watchdog_interval=0.01)
    notifier.ready()
    notifier.status("x")
    notifier.stopping()
    assert not notifier.enabled
    assert notifier.interval is None
    await asyncio.wait_for(notifier.watchdog_loop(), WAIT)


def test_from_environ_reads_and_removes_the_variables(tmp_path: Path) -> None:
    env = {
        "NOTIFY_SOCKET": str(tmp_path / "n.sock"),
        "WATCHDOG_USEC": "3000000",
        "WATCHDOG_PID": str(os.getpid()),
        "PATH": "/usr/bin",
    }
    notifier = Notifier.from_environ(env)
    notifier.close()
    assert notifier.enabled
    assert notifier.interval == 1.5
    assert env == {"PATH": "/usr/bin"}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
        ({"WATCHDOG_USEC": "1000000"}, 0.5),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "42"}, 0.5),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "43"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, pid=42) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@abc", "\0abc"),
        ("@", None),
        ("vsock:2:1", None),
        ("relative", None),
    ],
)
def test_socket_address(value: str, expected: str | None) -> None:
    assert socket_address(value) == expected


def test_ping_due() -> None:
    assert ping_due(lag=0.0, interval=1.0, responsive=True)
    assert ping_due(lag=1.0, interval=1.0, responsive=True)
    assert not ping_due(lag=1.01, interval=1.0, responsive=True)
    assert not ping_due(lag=0.0, interval=1.0, responsive=False)


async def test_watchdog_pings_periodically_until_closed(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    notifier = Notifier(path, watchdog_interval=0.02)
    task = asyncio.create_task(notifier.watchdog_loop())
    received = [await receive(sock) for _ in range(3)]
    notifier.close()
    await asyncio.wait_for(task, WAIT)
    assert received == ["WATCHDOG=1"] * 3
    assert notifier.skipped == 0


async def test_watchdog_skips_while_the_daemon_is_not_responsive(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    calls: list[int] = []

    def check() -> bool:
        calls.append(1)
        return len(calls) > 3

    notifier = Notifier(path, watchdog_interval=0.01)
    task = asyncio.create_task(notifier.watchdog_loop(check))
    assert await receive(sock) == "WATCHDOG=1"
    notifier.close()
    await asyncio.wait_for(task, WAIT)
    assert notifier.skipped == 3
    assert len(calls) == 4


async def test_watchdog_skips_when_the_loop_woke_late(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    clock = FakeClock()
    notifier = Notifier(path, watchdog_interval=0.02, clock=clock)
    task = asyncio.create_task(notifier.watchdog_loop())
    assert await receive(sock) == "WATCHDOG=1"
    # The loop is already waiting on its next deadline; moving the clock well past
    # it is what a blocked event loop looks like when the wait finally returns.
    clock.advance(1.0)
    assert await receive(sock) == "WATCHDOG=1"
    notifier.close()
    await asyncio.wait_for(task, WAIT)
    assert notifier.skipped == 1
