"""Spawning (process groups, death with the parent) and the /proc helpers, on uvloop."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvloop

from modeld.supervisor.process import (
    BackendProcess,
    ProcessSpawner,
    free_port,
    group_alive,
    group_members,
    kill_group,
    pid_alive,
    proc_pgid,
    proc_start_time,
    process_matches,
    wait_group_gone,
)

pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy"')

# A stand-in daemon: spawns a sleeper the way the daemon does (uvloop, ProcessSpawner),
# prints the sleeper's pid, then waits to be killed.
FAKE_DAEMON = textwrap.dedent(
    """
    import asyncio, os, sys, uvloop
    from modeld.supervisor.process import ProcessSpawner

    async def main():
        argv = [sys.executable, "-c", "import time; time.sleep(60)"]
        child = await ProcessSpawner().spawn(argv, env=os.environ, cwd=None)
        print(child.pid, flush=True)
        await asyncio.Event().wait()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    """
)
SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def event_loop_policy() -> asyncio.AbstractEventLoopPolicy:
    policy: asyncio.AbstractEventLoopPolicy = uvloop.EventLoopPolicy()
    return policy


@pytest.fixture
async def sleeper() -> AsyncIterator[BackendProcess]:
    proc = await ProcessSpawner().spawn(SLEEP, env=os.environ, cwd=None)
    yield proc
    kill_group(proc.pid, signal.SIGKILL)
    await proc.wait()


async def wait_pid_gone(pid: int, limit_s: float) -> None:
    """Wait (on a pidfd, no polling) until a process that is not our child exits."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    gone: asyncio.Future[None] = loop.create_future()

    def exited() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(fd, exited)
    try:
        async with asyncio.timeout(limit_s):
            await gone
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def test_child_dies_when_its_parent_is_killed_under_uvloop() -> None:
    daemon = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        FAKE_DAEMON,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert daemon.stdout is not None
    async with asyncio.timeout(10):
        child = int(await daemon.stdout.readline())
    assert pid_alive(child)
    assert proc_pgid(child) == child  # a session (and group) of its own

    daemon.kill()
    await daemon.wait()

    await wait_pid_gone(child, limit_s=2.0)
    assert not pid_alive(child)


async def test_spawned_process_leads_its_own_group(
    sleeper: BackendProcess,
) -> None:
    assert proc_pgid(sleeper.pid) == sleeper.pid != os.getpgid(0)
    assert os.getsid(sleeper.pid) == sleeper.pid
    assert group_members(sleeper.pid) == [sleeper.pid]


def comm_of(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


async def test_start_time_survives_odd_command_names() -> None:
    # prctl(PR_SET_NAME) gives the process a name with spaces and a ')'.
    rename = (
        "import ctypes, time; ctypes.CDLL(None).prctl(15, b'a) (b c', 0, 0, 0); "
        "print(1, flush=True); time.sleep(60)"
    )
    proc = await ProcessSpawner().spawn([sys.executable, "-c", rename], env=os.environ, cwd=None)
    try:
        await proc.stdout.readline()
        assert comm_of(proc.pid) == "a) (b c"
        start = proc_start_time(proc.pid)
        assert start is not None and start > 0
        assert process_matches(proc.pid, start)
        assert not process_matches(proc.pid, start + 1)
        assert proc_pgid(proc.pid) == proc.pid
    finally:
        kill_group(proc.pid, signal.SIGKILL)
        await proc.wait()


def test_a_zombie_counts_as_gone() -> None:
    proc = subprocess.Popen(["true"])
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
    assert Path(f"/proc/{proc.pid}").exists()
    assert not pid_alive(proc.pid)
    assert proc_start_time(proc.pid) is None
    proc.wait()


async def test_group_kill_reaches_every_member() -> None:
    script = "sleep 60 & echo $!; wait"
    proc = await ProcessSpawner().spawn(["sh", "-c", script], env=os.environ, cwd=None)
    worker = int(await proc.stdout.readline())
    assert sorted(group_members(proc.pid)) == sorted([proc.pid, worker])

    kill_group(proc.pid, signal.SIGTERM)
    assert await wait_group_gone(proc.pid, 2.0) == []
    await proc.wait()
    assert not group_alive(proc.pid)
    assert not pid_alive(worker)
    kill_group(proc.pid, signal.SIGKILL)  # an empty group is not an error


async def test_wait_group_gone_returns_survivors_at_the_deadline(
    sleeper: BackendProcess,
) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await wait_group_gone(sleeper.pid, 0.1) == [sleeper.pid]
    assert 0.09 < loop.time() - began < 1.0


async def test_backend_asks_for_sigkill_when_the_daemon_dies() -> None:
    # PR_GET_PDEATHSIG (2) in the backend itself, after the launcher's exec.
    show = (
        "import ctypes; v = ctypes.c_int(); "
        "ctypes.CDLL(None).prctl(2, ctypes.byref(v)); print(v.value)"
    )
    proc = await ProcessSpawner().spawn([sys.executable, "-c", show], env=os.environ, cwd=None)
    assert await proc.stdout.read() == f"{int(signal.SIGKILL)}\n".encode()
    assert await proc.wait() == 0
    assert proc.returncode == 0


async def test_exit_code_and_signal_are_reported(tmp_path: Path) -> None:
    proc = await ProcessSpawner().spawn(
        ["sh", "-c", "pwd; echo oops >&2; exit 7"], env={"PATH": os.defpath}, cwd=str(tmp_path)
    )
    assert await proc.stdout.read() == f"{tmp_path}\n".encode()
    assert await proc.stderr.read() == b"oops\n"
    assert await proc.wait() == 7
    sleeper = await ProcessSpawner().spawn(SLEEP, env=os.environ, cwd=None)
    kill_group(sleeper.pid, signal.SIGTERM)
    assert await sleeper.wait() == -signal.SIGTERM


async def test_a_missing_executable_fails_before_anything_runs() -> None:
    with pytest.raises(FileNotFoundError):
        await ProcessSpawner().spawn(["/nonexistent/backend"], env=os.environ, cwd=None)
    with pytest.raises(FileNotFoundError):
        await ProcessSpawner().spawn(["no-such-backend-binary"], env=os.environ, cwd=None)


def test_free_port_can_be_bound() -> None:
    import socket

    port = free_port("127.0.0.1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
