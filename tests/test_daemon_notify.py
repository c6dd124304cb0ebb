"""The real daemon under a fake systemd: the notify protocol on a datagram socket we own."""

import asyncio
import itertools
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from daemon_proc import start_daemon, write_config
from modeld._proto.modeld.v1 import modeld_pb2 as pb

ECHO_MIN_1 = """
[backends.echo]
command = ["{python}", "-m", "modeld.backends.echo", "--addr", "{addr}"]
stop_grace = "2s"
[models.echo]
backend = "echo"
min_replicas = 1
"""
WATCHDOG_USEC = 400_000  # pings every 0.2 s


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setblocking(False)
    yield sock
    sock.close()


class Systemd:
    """What the daemon told us, in order, with the time each message arrived."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.messages: list[tuple[float, str]] = []

    async def until(self, message: str, limit_s: float = 20.0) -> float:
        """Receive until `message` arrives; the time it did."""

        async def receive() -> float:
            loop = asyncio.get_running_loop()
            while True:
                data = (await loop.sock_recv(self.sock, 4096)).decode()
                self.messages.append((time.monotonic(), data))
                if data == message:
                    return time.monotonic()

        return await asyncio.wait_for(receive(), limit_s)

    def texts(self) -> list[str]:
        return [text for _, text in self.messages]


async def test_ready_after_serving_then_watchdog_status_and_stopping(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    config, addr = write_config(tmp_path, ECHO_MIN_1)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    d = await start_daemon(config, addr, wait=False, env=env)
    systemd = Systemd(notify_socket)
    try:
        await systemd.until("READY=1")
        # READY=1 promises a serving port and min_replicas up: no waiting from here on.
        health = health_pb2_grpc.HealthStub(d.channel)  # type: ignore[no-untyped-call]
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        replicas = (await d.stub.ListReplicas(pb.ListReplicasRequest(), timeout=2)).replicas
        assert [(r.model, r.state) for r in replicas] == [("echo", pb.READY)]
        assert "WATCHDOG=1" not in systemd.texts()
        ready_at = len(systemd.messages)
        await systemd.until("WATCHDOG=1")
        await systemd.until("WATCHDOG=1")
        after_ready = systemd.texts()[ready_at:]
        assert "STATUS=1 ready, 0 loading" in after_ready
        pings = [t for t, text in systemd.messages if text == "WATCHDOG=1"]
        assert all(b - a > 0.1 for a, b in itertools.pairwise(pings)), pings
        # The backend inherits the daemon's environment, but not its right to notify.
        environ = Path(f"/proc/{replicas[0].pid}/environ").read_bytes().split(b"\0")
        assert not [v for v in environ if v.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_"))]
        d.proc.send_signal(signal.SIGTERM)
        await systemd.until("STOPPING=1")
        assert await asyncio.wait_for(d.proc.wait(), 20) == 0
    finally:
        await d.close()
    texts = systemd.texts()
    assert texts.index("READY=1") < texts.index("STOPPING=1")
    assert texts.count("READY=1") == 1


async def test_a_refused_start_never_says_ready(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    config, addr = write_config(tmp_path, 'tls_cert = "/nonexistent/cert.pem"\n')
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    d = await start_daemon(config, addr, wait=False, env=env)
    try:
        assert await asyncio.wait_for(d.proc.wait(), 20) == 2
    finally:
        await d.close()
    with pytest.raises(BlockingIOError):
        notify_socket.recv(4096)
    assert d.raw == ["modeld: tls_cert and tls_key must be set together"]
