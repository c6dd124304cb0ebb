"""Supervision end to end: the real daemon, real backend processes, real signals."""

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from daemon_proc import pids_alive, running_daemon, start_daemon, wait_pids_gone, write_config
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.supervisor.process import proc_start_time

CATALOG = """
[backends.echo]
command = ["{python}", "-m", "modeld.backends.echo", "--addr", "{addr}"]
stop_grace = "1s"
[backends.crashy]
command = ["{python}", "-m", "modeld.backends.echo", "--addr", "{addr}", "--exit-on-start", "7"]
ready_timeout = "30s"
[backends.stubborn]
command = ["{python}", "-m", "modeld.backends.echo", "--addr", "{addr}",
           "--ignore-sigterm", "--spawn-grandchild"]
stop_grace = "500ms"
[backends.flood]
command = ["{python}", "-m", "modeld.backends.echo", "--addr", "{addr}", "--flood", "100000"]
[models.echo]
backend = "echo"
max_replicas = 3
[models.crashy]
backend = "crashy"
[models.stubborn]
backend = "stubborn"
[models.flood]
backend = "flood"
"""


async def test_load_reaches_ready_and_unload_stops(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, CATALOG) as d:
        loaded = await d.stub.Load(pb.LoadRequest(model="echo", replicas=2), timeout=30)
        assert [r.state for r in loaded.replicas] == [pb.READY, pb.READY]
        listed = await d.stub.ListReplicas(pb.ListReplicasRequest(model="echo"))
        assert {r.id for r in listed.replicas} == {r.id for r in loaded.replicas}
        pids = [r.pid for r in loaded.replicas]
        stopped = await d.stub.Unload(pb.UnloadRequest(model="echo"), timeout=30)
        assert {r.state for r in stopped.stopped} == {pb.STOPPED}
        assert await wait_pids_gone(pids, 1) == []


async def test_backend_exiting_at_start_fails_load_at_once(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, CATALOG) as d:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await d.stub.Load(pb.LoadRequest(model="crashy"), timeout=30)
        elapsed = time.monotonic() - started
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        details = info.value.details() or ""
        assert "fatal: exiting on purpose with 7" in details
        assert "exit" in details and "7" in details
        assert elapsed < 10, f"took {elapsed:.1f}s; ready_timeout is 30s"


async def test_stubborn_backend_and_its_grandchild_are_gone_after_unload(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, CATALOG) as d:
        loaded = await d.stub.Load(pb.LoadRequest(model="stubborn"), timeout=30)
        pid = loaded.replicas[0].pid
        lines = d.stub.StreamLogs(pb.StreamLogsRequest(model="stubborn", tail=100))
        texts = [line.text async for line in lines]
        grandchild = int(
            next(m.group(1) for t in texts if (m := re.search(r"grandchild pid=(\d+)", t)))
        )
        assert pids_alive([pid, grandchild]) == [pid, grandchild]
        await d.stub.Unload(pb.UnloadRequest(model="stubborn"), timeout=30)
        assert await wait_pids_gone([pid, grandchild], 1) == []


async def test_daemon_sigkill_leaves_no_backend(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, CATALOG, exit_code=-signal.SIGKILL) as d:
        loaded = await d.stub.Load(pb.LoadRequest(model="echo", replicas=3), timeout=30)
        pids = [r.pid for r in loaded.replicas]
        assert len(pids_alive(pids)) == 3
        d.proc.send_signal(signal.SIGKILL)
        await d.proc.wait()
        assert await wait_pids_gone(pids, 2) == []


async def test_crash_is_failed_and_an_event_without_any_request(tmp_path: Path) -> None:
    """The exit watch notices a crash by itself: no RPC (and so no health probe) runs
    between the kill and the FAILED event. How fast is a `make bench` figure
    (bench/latency_figures.py), not an assertion."""
    async with running_daemon(tmp_path, CATALOG) as d:
        events = d.stub.WatchEvents(pb.WatchEventsRequest(model="echo"))
        loaded = await d.stub.Load(pb.LoadRequest(model="echo"), timeout=30)
        replica = loaded.replicas[0]
        async with asyncio.timeout(10):
            # Seeing the READY event proves the stream was open before the kill.
            async for event in events:
                if event.to_state == pb.READY and event.replica_id == replica.id:
                    break
            os.kill(replica.pid, signal.SIGKILL)
            async for event in events:
                if event.to_state == pb.FAILED and event.replica_id == replica.id:
                    break
        events.cancel()
        assert "signal" in event.reason.lower()
        listed = await d.stub.ListReplicas(pb.ListReplicasRequest(model="echo"))
        assert [r.state for r in listed.replicas if r.id == replica.id] == [pb.FAILED]


async def test_output_flood_with_a_stalled_follower(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, CATALOG + "\n[logs]\nsubscriber_queue = 100\n") as d:
        follower = d.stub.StreamLogs(pb.StreamLogsRequest(model="flood", follow=True))
        await d.stub.Load(pb.LoadRequest(model="flood"), timeout=30)
        worst = 0.0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            started = time.monotonic()
            await d.stub.Health(pb.HealthRequest(model="flood"), timeout=5)
            worst = max(worst, time.monotonic() - started)
            tail = await _tail(d, "flood", 1)
            if tail == ["flood line 99999"]:
                break
        assert tail == ["flood line 99999"], tail
        # Every Health was answered within its 5 s deadline; the latency itself is a
        # `make bench` figure (bench/latency_figures.py), not an assertion.
        print(f"flood: worst Health latency {worst * 1000:.1f} ms")
        texts = []
        async for line in follower:
            texts.append(line.text)
            if "lines dropped" in line.text:
                break
        follower.cancel()
        assert any(re.search(r"\d+ lines dropped", t) for t in texts)


async def _tail(d, model: str, n: int) -> list[str]:  # type: ignore[no-untyped-def]
    lines = d.stub.StreamLogs(pb.StreamLogsRequest(model=model, tail=n * 5))
    return [line.text async for line in lines if line.stream == "stdout"][-n:]


async def test_escaping_symlink_is_refused_and_nothing_spawned(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, CATALOG) as d:
        (tmp_path / "models" / "evil").symlink_to("/etc/passwd")
        spec = pb.ModelSpec(name="evil", backend="echo", model_file="evil")
        await d.stub.PutModel(pb.PutModelRequest(spec=spec))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await d.stub.Load(pb.LoadRequest(model="evil"), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "outside the models directory" in (info.value.details() or "")
        listed = await d.stub.ListReplicas(pb.ListReplicasRequest(model="evil"))
        assert all(r.pid == 0 for r in listed.replicas)


async def test_orphans_of_a_previous_life(tmp_path: Path) -> None:
    config, addr = write_config(tmp_path, CATALOG)
    d = await start_daemon(config, addr)
    assert await d.stop() == 0
    orphan = subprocess.Popen(["sleep", "300"], start_new_session=True)
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        db = sqlite3.connect(tmp_path / "state" / "modeld.db")
        rows = [
            ("orphan", orphan.pid, orphan.pid, proc_start_time(orphan.pid)),
            (
                "recycled",
                bystander.pid,
                bystander.pid,
                (proc_start_time(bystander.pid) or 0) + 12345,
            ),
        ]
        for rid, pid, pgid, start in rows:
            db.execute(
                "INSERT INTO replicas (id, model, backend, state, pid, pgid, proc_start) "
                "VALUES (?, 'echo', 'echo', 'READY', ?, ?, ?)",
                (rid, pid, pgid, start),
            )
        db.commit()
        d = await start_daemon(config, addr)
        try:
            assert orphan.wait(timeout=10) is not None
            assert bystander.poll() is None
            states = dict(
                db.execute("SELECT id, state || ':' || last_error FROM replicas").fetchall()
            )
            assert states["orphan"].startswith("STOPPED") and "daemon_restart" in states["orphan"]
            assert states["recycled"].startswith("STOPPED")
        finally:
            db.close()
            await d.stop()
    finally:
        for proc in (orphan, bystander):
            proc.kill()
            proc.wait()
