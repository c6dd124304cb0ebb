"""Clean-up at start: rows of an earlier daemon, real processes, a real registry file."""

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modeld.clock import FakeClock
from modeld.storage.registry import Registry, ReplicaRow
from modeld.supervisor import sweep
from modeld.supervisor.containment import Containment
from modeld.supervisor.orphans import reap_orphans
from modeld.supervisor.process import kill_group, pid_alive, proc_start_time

SLEEP = (sys.executable, "-c", "import time; time.sleep(60)")
IGNORE_TERM = (
    sys.executable,
    "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print(1, flush=True); time.sleep(60)",
)


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    reg = await Registry.open(tmp_path / "modeld.db")
    yield reg
    await reg.close()


@pytest.fixture
async def procs() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    started: list[asyncio.subprocess.Process] = []
    yield started
    for proc in started:
        kill_group(proc.pid, signal.SIGKILL)
        await proc.wait()


async def start(
    procs: list[asyncio.subprocess.Process], argv: tuple[str, ...] = SLEEP
) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, start_new_session=True
    )
    procs.append(proc)
    return proc


def row_for(replica_id: str, pid: int, start: int | None, state: str = "READY") -> ReplicaRow:
    return ReplicaRow(
        id=replica_id,
        model="m",
        backend="echo",
        state=state,
        pid=pid,
        pgid=pid,
        proc_start=start,
        started_at=1.0,
    )


async def test_stops_a_matching_process_and_marks_its_row(
    registry: Registry, procs: list[asyncio.subprocess.Process]
) -> None:
    proc = await start(procs)
    await registry.insert_replica(row_for("r1", proc.pid, proc_start_time(proc.pid)))

    handled = await reap_orphans(registry, grace=2.0, clock=FakeClock())

    assert handled == ["r1"]
    assert await asyncio.wait_for(proc.wait(), 2.0) == -signal.SIGTERM
    row = await registry.get_replica("r1")
    assert row is not None and row.state == "STOPPED"
    assert row.last_error == "daemon_restart" and row.stopped_at == FakeClock().wall()
    assert await registry.live_replicas() == []


async def test_kills_after_grace_when_sigterm_is_ignored(
    registry: Registry, procs: list[asyncio.subprocess.Process]
) -> None:
    proc = await start(procs, IGNORE_TERM)
    assert proc.stdout is not None
    await proc.stdout.readline()  # the SIGTERM handler is in place
    await registry.insert_replica(row_for("r1", proc.pid, proc_start_time(proc.pid)))

    await reap_orphans(registry, grace=0.2)

    assert await asyncio.wait_for(proc.wait(), 2.0) == -signal.SIGKILL


async def test_leaves_a_recycled_pid_alone(
    registry: Registry, procs: list[asyncio.subprocess.Process]
) -> None:
    unrelated = await start(procs)
    start_time = proc_start_time(unrelated.pid)
    assert start_time is not None
    await registry.insert_replica(row_for("r1", unrelated.pid, start_time - 1))
    await registry.insert_replica(row_for("r2", unrelated.pid, None, state="STARTING"))

    handled = await reap_orphans(registry, grace=0.2)

    assert sorted(handled) == ["r1", "r2"]
    assert pid_alive(unrelated.pid) and unrelated.returncode is None
    for rid in handled:
        row = await registry.get_replica(rid)
        assert row is not None and row.state == "STOPPED" and row.last_error == "daemon_restart"


async def test_terminal_rows_and_gone_processes(registry: Registry) -> None:
    gone = await asyncio.create_subprocess_exec(*SLEEP, start_new_session=True)
    start_time = proc_start_time(gone.pid)
    gone.kill()
    await gone.wait()
    await registry.insert_replica(row_for("live", gone.pid, start_time))
    await registry.insert_replica(row_for("done", os.getpid(), None, state="STOPPED"))

    assert await reap_orphans(registry) == ["live"]
    done = await registry.get_replica("done")
    assert done is not None and done.last_error == ""


async def test_strays_of_this_instance_are_stopped_though_their_leader_is_dead(
    registry: Registry, procs: list[asyncio.subprocess.Process]
) -> None:
    earlier = Containment.marker_only("inst")
    now = Containment("marker", "inst", "newrun", None, "test")

    async def marked(containment: Containment, argv: tuple[str, ...]) -> asyncio.subprocess.Process:
        env = {**os.environ, sweep.MARKER: containment.box("r1").owner}
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.PIPE, start_new_session=True
        )
        procs.append(proc)
        return proc

    gone = await asyncio.create_subprocess_exec(*SLEEP, start_new_session=True)
    start_time = proc_start_time(gone.pid)
    gone.kill()
    await gone.wait()
    await registry.insert_replica(row_for("r1", gone.pid, start_time))
    polite = await marked(earlier, SLEEP)
    stubborn = await marked(earlier, IGNORE_TERM)
    assert stubborn.stdout is not None
    await stubborn.stdout.readline()  # the SIGTERM handler is in place
    stranger = await marked(Containment.marker_only("other"), SLEEP)

    assert await reap_orphans(registry, grace=0.5, containment=now) == ["r1"]

    assert await asyncio.wait_for(polite.wait(), 2.0) == -signal.SIGTERM
    assert await asyncio.wait_for(stubborn.wait(), 2.0) == -signal.SIGKILL
    assert pid_alive(stranger.pid)
