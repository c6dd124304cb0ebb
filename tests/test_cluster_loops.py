"""Every loop of the cluster runs under the daemon's task supervisor: one that dies
turns health NOT_SERVING and is named in the log (`task_died`) and in the systemd
STATUS line, instead of leaving a host that serves but no longer takes part.

Each case replaces one loop before the daemon starts with one that dies when the
test says so; the daemon is real (in-process, with its real gRPC health servicer)
and so is its PostgreSQL."""

import asyncio
from pathlib import Path
from typing import Any

import pytest
import structlog
from grpc_health.v1 import health_pb2

from modeld import config
from modeld.cluster.leader import Leader
from modeld.cluster.link import Link
from modeld.cluster.membership import Membership
from modeld.cluster.slotgate import SlotGate
from modeld.cluster.specs import SharedSpecs
from modeld.server import SERVICE, Daemon

WAIT = 20.0
LOOPS: dict[str, tuple[type, str]] = {
    "cluster-link": (Link, "_keep"),
    "cluster-keepalive": (Membership, "_keep_alive"),
    "cluster-reread": (Membership, "_reread"),
    "cluster-publish": (Membership, "_publish"),
    "cluster-events": (Membership, "_follow_events"),
    "cluster-deaths": (Leader, "_watch_deaths"),
    "cluster-specs": (SharedSpecs, "_run"),
    "cluster-slots": (SlotGate, "_keep_slots"),
    "cluster-scale-ups": (SlotGate, "_take_scale_ups"),
}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(daemon: Daemon) -> Any:
    check = health_pb2.HealthCheckRequest(service=SERVICE)
    return (await daemon.health.Check(check, None)).status  # type: ignore[arg-type]


async def _until_status(daemon: Daemon, want: Any) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT
    while await _status(daemon) != want:
        assert asyncio.get_running_loop().time() < deadline, f"health never became {want}"
        await asyncio.sleep(0)


@pytest.mark.parametrize("name", sorted(LOOPS))
async def test_a_cluster_loop_that_dies_turns_health_not_serving(
    name: str, tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kill = asyncio.Event()

    async def dies(self: object) -> None:
        await kill.wait()
        raise RuntimeError(f"the test broke {name}")

    owner, method = LOOPS[name]
    monkeypatch.setattr(owner, method, dies)
    cfg = config.load(
        env={},
        overrides={
            "listen": [f"unix://{tmp_path}/s.sock"],
            "state_dir": str(tmp_path),
            "cluster.dsn": pg_dsn,
            "cluster.host_id": "h1",
            "cluster.advertise": "127.0.0.1:1",
        },
    )
    daemon = Daemon(cfg)
    statuses: list[str] = []
    monkeypatch.setattr(daemon.notifier, "status", statuses.append)
    with structlog.testing.capture_logs() as logs:
        await daemon.start()
        try:
            assert await _status(daemon) == SERVING
            kill.set()
            await _until_status(daemon, NOT_SERVING)
        finally:
            await daemon.shutdown()
    assert [e["task"] for e in logs if e["event"] == "task_died"] == [name]
    assert f"degraded: background task {name} died" in statuses
