"""Supervised background tasks: a task that dies is logged with its traceback and makes
the daemon unhealthy (gRPC health NOT_SERVING, the systemd watchdog no longer fed)."""

import asyncio
from pathlib import Path

import structlog
from grpc_health.v1 import health_pb2

from modeld import config
from modeld.ops.tasks import TaskSupervisor
from modeld.server import SERVICE, Daemon

WAIT = 5.0


async def _dies() -> None:
    raise RuntimeError("lease table corrupted")


async def _forever() -> None:
    await asyncio.Event().wait()


async def test_a_task_that_dies_is_logged_with_its_traceback_and_reported() -> None:
    died: list[str] = []
    reported = asyncio.Event()

    def on_death(name: str) -> None:
        died.append(name)
        reported.set()

    tasks = TaskSupervisor(on_death=on_death)
    with structlog.testing.capture_logs() as logs:
        tasks.spawn(_forever(), "calm")
        tasks.spawn(_dies(), "lease-expiry")
        await asyncio.wait_for(reported.wait(), WAIT)
    assert died == ["lease-expiry"]
    assert not tasks.healthy()
    [entry] = [e for e in logs if e["event"] == "task_died"]
    assert entry["task"] == "lease-expiry"
    assert isinstance(entry["exc_info"], RuntimeError)
    await tasks.close()
    assert died == ["lease-expiry"], "cancelling at shutdown is no death"


async def test_cancelled_tasks_are_not_deaths() -> None:
    tasks = TaskSupervisor(on_death=lambda name: None)
    tasks.spawn(_forever(), "calm")
    await tasks.close()
    assert tasks.healthy()


async def test_the_daemon_stops_serving_when_a_task_dies(tmp_path: Path) -> None:
    cfg = config.load(
        env={},
        overrides={"listen": [f"unix://{tmp_path}/s.sock"], "state_dir": str(tmp_path)},
    )
    daemon = Daemon(cfg)
    await daemon.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    assert daemon._responsive()
    daemon.tasks.spawn(_dies(), "watchdog")
    for _ in range(100):
        if not daemon._responsive():
            break
        await asyncio.sleep(0)
    assert not daemon._responsive()
    check = health_pb2.HealthCheckRequest(service=SERVICE)
    for _ in range(100):
        reply = await daemon.health.Check(check, None)  # type: ignore[arg-type]
        if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        await asyncio.sleep(0)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await daemon.tasks.close()
