"""Spawning backend processes, and what Linux tells us about processes.

Every backend runs in a session (and so a process group) of its own, so one
signal reaches it and every worker it forks that stays in the group. It also
asks the kernel for SIGKILL when the daemon dies (PR_SET_PDEATHSIG), so even a
daemon killed by SIGKILL leaves no backend behind. What the backend starts is
contained by its replica's box (containment.py): the launcher joins the box's
cgroup, when there is one, before it execs the backend.

That request is made by a tiny launcher (`python -I -S -c LAUNCHER`) which then
execs the backend in the same process, rather than by a preexec_fn: under
uvloop a preexec_fn runs Python in the forked child of a process full of
threads (gRPC, SQLite), and such children were seen to die of SIGSEGV now and
then. subprocess.Popen without preexec_fn forks (or vforks) and execs in C.

Processes are identified by (pid, start time): a pid alone may have been
handed to an unrelated process since it was recorded. A zombie counts as gone:
it holds no memory, and in a container whose init does not reap orphans it may
linger forever.
"""

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Protocol

_PROC = Path("/proc")
EXIT_LAUNCH_FAILED = 127

# argv: PARENT_PID CGROUP_DIR_OR_EMPTY COMMAND [ARGS...]. If the daemon died before prctl
# took effect the signal will never come, so the launcher also checks who its parent is.
# It joins the replica's cgroup (if any) before the exec, so the backend and all it ever
# starts are inside from the first instruction. Python ignores SIGPIPE and an exec keeps
# ignored signals ignored: the backend gets the default back.
LAUNCHER = f"""\
import ctypes, os, signal, sys
PR_SET_PDEATHSIG, SIGKILL = 1, 9
ok = ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(SIGKILL), ctypes.c_ulong(0),
                             ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
if not ok or os.getppid() != int(sys.argv[1]):
    os._exit({EXIT_LAUNCH_FAILED})
if sys.argv[2]:
    try:
        with open(os.path.join(sys.argv[2], "cgroup.procs"), "w") as procs:
            procs.write("0")
    except OSError as exc:
        sys.stderr.write(f"modeld launcher: cannot join {{sys.argv[2]}}: {{exc.strerror}}\\n")
        os._exit({EXIT_LAUNCH_FAILED})
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
try:
    os.execvp(sys.argv[3], sys.argv[3:])
except OSError as exc:
    sys.stderr.write(f"modeld launcher: cannot run {{sys.argv[3]!r}}: {{exc.strerror}}\\n")
    os._exit({EXIT_LAUNCH_FAILED})
"""


class BackendProcess:
    """A spawned backend: its pid, its output pipes as StreamReaders, and its exit.

    The exit is awaited on a pidfd, which becomes readable when the process
    exits; the process is then reaped here, by pid, and by no one else.
    """

    def __init__(
        self,
        popen: "subprocess.Popen[bytes]",
        stdout: asyncio.StreamReader,
        stderr: asyncio.StreamReader,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._popen = popen
        self.stdout = stdout
        self.stderr = stderr
        self._loop = loop
        self._exited: asyncio.Future[int] = loop.create_future()
        self._pidfd = os.pidfd_open(popen.pid)
        loop.add_reader(self._pidfd, self._reap)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit code, or minus the signal that killed it; None until it is reaped."""
        return self._popen.returncode

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def _reap(self) -> None:
        code = self._popen.poll()
        if code is None:
            return
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        if not self._exited.done():
            self._exited.set_result(code)


class Spawner(Protocol):
    """Starts a process whose stdout/stderr are pipes and whose group is its own."""

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | None,
        cgroup: Path | None = None,
    ) -> BackendProcess: ...


class ProcessSpawner:
    """The real spawner: new session, stdin closed, death tied to this process.

    Call it from the event loop's thread, which lives as long as the daemon:
    the kernel sends PR_SET_PDEATHSIG when the *thread* that forked the child ends.
    """

    def __init__(self, python: str = sys.executable) -> None:
        self._python = python

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | None,
        cgroup: Path | None = None,
    ) -> BackendProcess:
        """`cgroup`: a cgroup v2 directory the process joins before the backend runs."""
        if not argv:
            raise ValueError("empty argv")
        if shutil.which(argv[0], path=env.get("PATH", os.defpath)) is None:
            raise FileNotFoundError(errno.ENOENT, "no such executable", argv[0])
        popen = _launch(
            [
                self._python,
                "-I",
                "-S",
                "-c",
                LAUNCHER,
                str(os.getpid()),
                str(cgroup or ""),
                *argv,
            ],
            env,
            cwd,
        )
        try:
            loop = asyncio.get_running_loop()
            stdout = await _stream(loop, popen.stdout)
            stderr = await _stream(loop, popen.stderr)
            return BackendProcess(popen, stdout, stderr, loop)
        except BaseException:
            kill_group(popen.pid, signal.SIGKILL)
            popen.wait()
            raise


def _launch(argv: list[str], env: Mapping[str, str], cwd: str | None) -> "subprocess.Popen[bytes]":
    """Fork (or vfork) and exec, all in C; blocks only until the exec (a few ms)."""
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env),
        cwd=cwd,
        start_new_session=True,
    )


async def _stream(loop: asyncio.AbstractEventLoop, pipe: IO[bytes] | None) -> asyncio.StreamReader:
    if pipe is None:
        raise RuntimeError("the child's output is not a pipe")
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    return reader


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

    Lists the group (a scan of /proc), waits on pidfds until every listed member
    has exited, and only then lists again: one scan per round, not one per exit.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while members := group_members(pgid):
        left = deadline - loop.time()
        if left <= 0 or not await wait_pids_gone(members, left):
            return group_members(pgid)
    return []


async def wait_pids_gone(pids: Iterable[int], limit_s: float) -> bool:
    """True once every one of `pids` has exited (or was gone already), False after `limit_s`.

    Each pid is pinned by a pidfd when the wait begins, so a pid reused meanwhile
    by another process does not make this wait for that one.
    """
    loop = asyncio.get_running_loop()
    fds: list[int] = []
    waiting: set[int] = set()
    all_gone: asyncio.Future[None] = loop.create_future()

    def on_exit(fd: int) -> None:
        loop.remove_reader(fd)
        waiting.discard(fd)
        if not waiting and not all_gone.done():
            all_gone.set_result(None)

    try:
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            fds.append(fd)
            waiting.add(fd)
            loop.add_reader(fd, on_exit, fd)
        if not waiting:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit_s):
                await all_gone
        return all_gone.done()
    finally:
        for fd in fds:
            if fd in waiting:
                loop.remove_reader(fd)
            os.close(fd)
