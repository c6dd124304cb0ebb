"""Spawning backend processes, and what Linux tells us about processes.

Every backend runs in a session (and so a process group) of its own, so one
signal reaches it and every worker it forks. The child also asks the kernel for
SIGKILL when its parent dies (PR_SET_PDEATHSIG), so even a daemon killed by
SIGKILL leaves no backend behind.

Processes are identified by (pid, start time): a pid alone may have been
handed to an unrelated process since it was recorded. A zombie counts as gone:
it holds no memory, and in a container whose init does not reap orphans it may
linger forever.
"""

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

_PROC = Path("/proc")
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.restype = ctypes.c_int
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class Spawner(Protocol):
    """Starts a process whose stdout/stderr are pipes and whose group is its own."""

    async def spawn(
        self, argv: Sequence[str], *, env: Mapping[str, str], cwd: str | None
    ) -> asyncio.subprocess.Process: ...


class ProcessSpawner:
    """The real spawner: new session, stdin closed, death tied to this process."""

    async def spawn(
        self, argv: Sequence[str], *, env: Mapping[str, str], cwd: str | None
    ) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=die_with_parent(os.getpid()),
        )


def die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A preexec_fn (runs in the child between fork and exec; works under uvloop too).

    If the parent died before prctl took effect the signal will never come, so
    the child checks its parent is still the one that forked it, and quits if not.
    """

    def preexec() -> None:
        if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def free_port(host: str) -> int:
    """A loopback port that was free a moment ago (the child may still lose a race for it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (the command name, field 2, may hold spaces and ')')."""
    try:
        raw = (_PROC / str(pid) / "stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None
    return raw.rpartition(b")")[2].decode("ascii", "replace").split()


def _live_fields(pid: int) -> list[str] | None:
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return fields


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: start time in clock ticks since boot; None if gone."""
    fields = _live_fields(pid)
    return int(fields[19]) if fields else None


def proc_pgid(pid: int) -> int | None:
    """The process group of a running process; None if it is gone."""
    fields = _live_fields(pid)
    return int(fields[2]) if fields else None


def pid_alive(pid: int) -> bool:
    return _live_fields(pid) is not None


def process_matches(pid: int, start: int) -> bool:
    """True only for the very process recorded as (pid, start), still running."""
    return proc_start_time(pid) == start


def kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    members = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _live_fields(int(entry.name))
        if fields is not None and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


async def wait_group_gone(pgid: int, limit_s: float) -> list[int]:
    """Wait up to `limit_s` for every process of the group to exit; returns the survivors.

    Waits on pidfds (readable when the process exits), so nothing polls: the
    group is re-listed only when one of its members has exited.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while members := group_members(pgid):
        left = deadline - loop.time()
        if left <= 0 or not await _wait_any_exit(members, left):
            return group_members(pgid)
    return []


async def _wait_any_exit(pids: Iterable[int], limit_s: float) -> bool:
    """True once any of `pids` exits (or is already gone), False after `limit_s`."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()
    fds: list[int] = []

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    try:
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                return True
            fds.append(fd)
            loop.add_reader(fd, on_exit)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit_s):
                await exited
        return exited.done()
    finally:
        for fd in fds:
            loop.remove_reader(fd)
            os.close(fd)
