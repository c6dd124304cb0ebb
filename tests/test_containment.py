"""Containment with real processes: boxes find and stop only their own, whatever they did."""

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from daemon_proc import pids_alive
from modeld.errors import ConfigError
from modeld.supervisor import sweep
from modeld.supervisor.containment import Containment, Sentinel, choose, own_cgroup

SLEEP = (sys.executable, "-c", "import time; time.sleep(60)")
Start = Callable[..., "asyncio.Future[asyncio.subprocess.Process]"]


@pytest.fixture
async def started() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    procs: list[asyncio.subprocess.Process] = []
    yield procs
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def spawn(
    procs: list[asyncio.subprocess.Process], owner: str | None
) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if k != sweep.MARKER}
    if owner is not None:
        env[sweep.MARKER] = owner
    # A session of its own: like a worker that left its backend's process group.
    proc = await asyncio.create_subprocess_exec(*SLEEP, env=env, start_new_session=True)
    procs.append(proc)
    return proc


def test_own_cgroup_joins_the_cgroup2_mount_and_the_path(tmp_path: Path) -> None:
    cgroup, mountinfo = tmp_path / "cgroup", tmp_path / "mountinfo"
    cgroup.write_text("1:cpu:/\n0::/system.slice/modeld.service\n")
    mountinfo.write_text(
        "30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu\n"
        "35 25 0:31 / /sys/fs/cgroup/unified rw,relatime shared:14 - cgroup2 cgroup2 rw\n"
    )
    assert own_cgroup(cgroup, mountinfo) == Path(
        "/sys/fs/cgroup/unified/system.slice/modeld.service"
    )
    cgroup.write_text("1:cpu:/\n")
    assert own_cgroup(cgroup, mountinfo) is None


def test_choose_falls_back_to_the_marker_or_refuses_when_forced(tmp_path: Path) -> None:
    not_a_cgroup = tmp_path / "plain-dir"
    chosen = choose(tmp_path / "state", "auto", str(not_a_cgroup))
    assert chosen.mechanism == "marker" and "cgroup.kill" in chosen.why
    with pytest.raises(ConfigError, match="containment = cgroup, but"):
        choose(tmp_path / "state", "cgroup", str(not_a_cgroup))
    assert choose(tmp_path / "state", "marker").mechanism == "marker"
    # One state_dir, one instance; another state_dir, another.
    assert choose(tmp_path / "state", "marker").instance == chosen.instance
    assert choose(tmp_path / "other", "marker").instance != chosen.instance


async def test_a_marker_box_holds_its_replica_only(
    started: list[asyncio.subprocess.Process],
) -> None:
    ours = Containment.marker_only("inst")
    box = ours.box("r1")
    mine = await spawn(started, box.owner)
    sibling = await spawn(started, ours.box("r10").owner)  # a prefix of neither
    decoy = await spawn(started, None)  # the same command line, no marker
    stranger = await spawn(started, Containment.marker_only("other").box("r1").owner)

    assert box.members() == [mine.pid]
    box.signal(signal.SIGKILL)
    assert await asyncio.wait_for(mine.wait(), 5) == -signal.SIGKILL
    assert await box.wait_empty(5) == []
    assert box.seen == {mine.pid}
    others = sorted(p.pid for p in (sibling, decoy, stranger))
    assert pids_alive(others) == others


async def test_the_sweep_at_start_kills_earlier_runs_of_this_instance_only(
    started: list[asyncio.subprocess.Process],
) -> None:
    earlier = Containment.marker_only("inst")
    now = Containment("marker", "inst", "newrun", None, "test")
    left = [await spawn(started, earlier.box(f"r{i}").owner) for i in range(3)]
    stranger = await spawn(started, Containment.marker_only("other").box("r1").owner)
    decoy = await spawn(started, None)

    assert now.earlier_members() == sorted(p.pid for p in left)
    assert await asyncio.to_thread(now.sweep_earlier_runs, 5.0) == []
    assert [await asyncio.wait_for(p.wait(), 5) for p in left] == [-signal.SIGKILL] * 3
    assert pids_alive([stranger.pid, decoy.pid]) == [stranger.pid, decoy.pid]


async def test_the_sentinel_kills_its_run_once_modeld_is_gone(
    started: list[asyncio.subprocess.Process],
) -> None:
    run = Containment.marker_only("inst")
    other_run = Containment.marker_only("inst")
    mine = [await spawn(started, run.box(r).owner) for r in ("r1", "r2")]
    theirs = await spawn(started, other_run.box("r1").owner)
    sentinel = Sentinel(run)
    assert pids_alive([p.pid for p in mine]) == [p.pid for p in mine]

    # EOF on its pipe: what it sees when modeld dies, however it dies.
    assert await sentinel.close() == 0
    assert [await asyncio.wait_for(p.wait(), 5) for p in mine] == [-signal.SIGKILL] * 2
    assert pids_alive([theirs.pid]) == [theirs.pid]
