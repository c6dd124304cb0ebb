"""Containment with real processes: boxes find and stop only their own, whatever they did."""

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon_proc import pids_alive, start_daemon, write_config
from modeld import config
from modeld.errors import ConfigError
from modeld.supervisor import sweep
from modeld.supervisor.containment import (
    Containment,
    Sentinel,
    choose,
    choose_soon,
    own_cgroup,
)

SLEEP = (sys.executable, "-c", "import time; time.sleep(60)")


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


def test_choose_soon_answers_as_choose_does_errors_included(tmp_path: Path) -> None:
    not_a_cgroup = str(tmp_path / "plain-dir")
    soon = choose_soon(tmp_path / "state", "auto", not_a_cgroup).result(timeout=30)
    now = choose(tmp_path / "state", "auto", not_a_cgroup)
    assert (soon.mechanism, soon.instance, soon.why) == (now.mechanism, now.instance, now.why)
    refused = choose_soon(tmp_path / "state", "cgroup", not_a_cgroup).exception(timeout=30)
    assert isinstance(refused, ConfigError) and "containment = cgroup, but" in str(refused)


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


async def test_a_wait_lists_the_box_once_per_round_not_once_per_exit(
    started: list[asyncio.subprocess.Process], monkeypatch: pytest.MonkeyPatch
) -> None:
    box = Containment.marker_only("inst").box("r1")
    procs = [await spawn(started, box.owner) for _ in range(3)]
    scans: list[list[int]] = []
    listed = asyncio.Event()
    loop = asyncio.get_running_loop()
    real = sweep.marked_pids

    def counted(prefix: str) -> list[int]:
        scans.append(found := real(prefix))
        loop.call_soon_threadsafe(listed.set)
        return found

    monkeypatch.setattr(sweep, "marked_pids", counted)

    waiting = asyncio.ensure_future(box.wait_empty(30))
    await listed.wait()
    assert len(scans) == 1 and sorted(scans[0]) == sorted(p.pid for p in procs)
    for proc in procs:  # one exit after another, each awaited
        proc.kill()
        await proc.wait()
    assert await waiting == []
    # Once to list the three, once to see that nothing new appeared meanwhile.
    assert len(scans) == 2


def test_the_mechanism_is_a_checked_config_key(tmp_path: Path) -> None:
    assert config.load(env={}).containment == "auto"
    assert config.load(env={"MODELD_CONTAINMENT": "marker"}).containment == "marker"
    with pytest.raises(ConfigError, match="containment"):
        config.load(env={"MODELD_CONTAINMENT": "bogus"})


def test_config_show_says_which_mechanism_this_host_gives(tmp_path: Path) -> None:
    path = tmp_path / "modeld.toml"
    path.write_text(f'containment = "marker"\nstate_dir = "{tmp_path}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELD_")}
    shown = subprocess.run(
        [sys.executable, "-m", "modeld.cli.main", "config", "show", "--config", str(path)],
        capture_output=True, text=True, check=True, env=env, timeout=60,
    )  # fmt: skip
    in_use = json.loads(shown.stdout)["containment_in_use"]
    assert in_use["mechanism"] == "marker" and in_use["why"] == "containment = marker"


async def test_serve_refuses_a_forced_cgroup_it_cannot_have(tmp_path: Path) -> None:
    plain = tmp_path / "not-a-cgroup"
    config_path, addr = write_config(tmp_path, f'containment = "cgroup"\ncgroup_dir = "{plain}"\n')
    d = await start_daemon(config_path, addr, wait=False)
    try:
        assert await asyncio.wait_for(d.proc.wait(), 60) == 2
        await d.close()
        assert any("containment = cgroup, but" in line for line in d.raw), d.raw[-5:]
    finally:
        await d.close()


async def test_members_signalled_through_their_group_get_one_sigterm_only(
    started: list[asyncio.subprocess.Process],
) -> None:
    box = Containment.marker_only("inst").box("r1")
    counting = (
        sys.executable, "-c",
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: print('TERM', flush=True))\n"
        "print('ready', flush=True); time.sleep(2); sys.exit(0)",
    )  # fmt: skip
    env = {**os.environ, sweep.MARKER: box.owner}
    in_group = await asyncio.create_subprocess_exec(
        *counting, env=env, start_new_session=True, stdout=asyncio.subprocess.PIPE
    )
    started.append(in_group)
    escaped = await asyncio.create_subprocess_exec(
        *counting, env=env, start_new_session=True, stdout=asyncio.subprocess.PIPE
    )
    started.append(escaped)
    for proc in (in_group, escaped):
        assert proc.stdout is not None and await proc.stdout.readline() == b"ready\n"

    os.killpg(in_group.pid, signal.SIGTERM)
    box.signal(signal.SIGTERM, except_group=in_group.pid)

    outputs = [(await p.communicate())[0] for p in (in_group, escaped)]
    assert outputs == [b"TERM\n", b"TERM\n"]
