"""Containment: how modeld knows, and stops, every process a backend ever started.

A process group is not enough: a worker that calls setsid() or double-forks
leaves it, and PR_SET_PDEATHSIG reaches only the backend itself. So each replica
gets a **box** holding all its descendants, by one of two mechanisms:

- `cgroup` (preferred): a cgroup v2 of its own, `<cgroup_dir>/modeld-INSTANCE/RUN-REPLICA`.
  The launcher moves itself into it before it execs the backend, so nothing the
  backend starts is ever outside; `cgroup.procs` lists the members (no /proc
  scan) and `cgroup.kill` kills them all at once. It needs a writable cgroup v2
  tree with cgroup.kill (Linux 5.14+): root, or a systemd service with Delegate=yes.
- `marker` (everywhere else): the `MODELD_OWNER=INSTANCE/RUN/REPLICA` environment
  variable, inherited by every descendant; members are found by one /proc scan
  per round of a stop (not one per signal or per exit), and signalled through
  pidfds after their marker is read again. A process that execs itself with a
  fresh environment escapes it: that is the mechanism's limit.

Both mechanisms set the marker, so a restarted modeld finds what an earlier run
left whichever mechanism that run used. Three things use the boxes:

- a replica's stop, crash and failed start: SIGTERM/SIGKILL reach every member,
  and the replica is STOPPED (or FAILED) only once its box is empty;
- the **sentinel** (sweep.py), one small process per modeld run, that kills
  everything of its run as soon as modeld dies, even by SIGKILL (within ~2 s);
- the clean-up at start (orphans.py), which kills whatever any earlier run of
  this instance left (the sentinel too may have been killed).

INSTANCE is a hash of the resolved state_dir, so a second modeld with its own
state_dir never touches this one's processes, nor this one its; unrelated
processes carry no marker and sit in no cgroup of ours.

Config: `containment = "auto" | "cgroup" | "marker"` (auto: cgroup when the probe
below passes, else marker; cgroup: refuse to start without it) and `cgroup_dir`
(default: the cgroup modeld runs in). The choice and its reason are logged at
start (`containment`) and shown by `modeld config show`.
"""

import asyncio
import contextlib
import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from modeld.errors import ConfigError
from modeld.supervisor import sweep
from modeld.supervisor.process import proc_pgid, wait_pids_gone

MECHANISMS = ("auto", "cgroup", "marker")
_SELF_CGROUP = Path("/proc/self/cgroup")
_MOUNTINFO = Path("/proc/self/mountinfo")


def instance_id(state_dir: Path) -> str:
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Box:
    """The processes of one replica: its marker, and its cgroup when there is one."""

    owner: str
    cgroup: Path | None
    # Every pid ever listed in the box: what a GPU may still list after they exited.
    seen: set[int] = field(default_factory=set, compare=False)

    @property
    def env(self) -> Mapping[str, str]:
        return {sweep.MARKER: self.owner}

    def prepare(self) -> None:
        """Create the cgroup (if any) before a process is spawned into it."""
        if self.cgroup is not None:
            self.cgroup.mkdir(parents=True, exist_ok=True)

    def members(self) -> list[int]:
        """Live processes in the box: cgroup.procs, or one scan of /proc for the marker."""
        if self.cgroup is not None:
            found = sweep.cgroup_pids(self.cgroup)
        else:
            found = sweep.marked_pids(self.owner)
        self.seen.update(found)
        return found

    def signal(self, sig: int, *, except_group: int | None = None) -> None:
        """Signal every member, but those in `except_group` (already signalled through
        their group: many programs read a second SIGTERM as "exit now, skip clean-up")."""
        members = self.members()
        if self.cgroup is not None and sig == signal.SIGKILL:
            sweep.cgroup_kill(self.cgroup)
            return
        if except_group is not None:
            members = [pid for pid in members if proc_pgid(pid) != except_group]
        if self.cgroup is None:
            sweep.signal_marked(members, self.owner, sig)
            return
        for pid in members:
            with contextlib.suppress(OSError):  # gone, or no longer ours to signal
                os.kill(pid, sig)

    async def wait_empty(self, limit_s: float) -> list[int]:
        """Wait until no process is left in the box; returns those left at the deadline.

        Lists the members, waits on pidfds until every one of them has exited, and
        only then lists again (for what they started meanwhile).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while members := await asyncio.to_thread(self.members):
            left = deadline - loop.time()
            if left <= 0 or await wait_pids_gone(members, left):
                return await asyncio.to_thread(self.members)
        return []

    def close(self) -> None:
        if self.cgroup is not None:
            sweep.cgroup_remove(self.cgroup)


@dataclass(frozen=True)
class Containment:
    mechanism: str  # "cgroup" or "marker"
    instance: str
    run: str
    cgroup_dir: Path | None  # <cgroup_dir>/modeld-INSTANCE, with the cgroup mechanism
    why: str

    @classmethod
    def marker_only(cls, instance: str = "", why: str = "chosen") -> "Containment":
        return cls("marker", instance or uuid.uuid4().hex[:16], _new_run(), None, why)

    @property
    def prefix(self) -> str:
        """The marker prefix of every run of this instance."""
        return f"{self.instance}/"

    @property
    def run_prefix(self) -> str:
        return f"{self.instance}/{self.run}/"

    def box(self, replica_id: str) -> Box:
        cgroup = self.cgroup_dir / f"{self.run}-{replica_id}" if self.cgroup_dir else None
        return Box(sweep.marker_value(self.instance, self.run, replica_id), cgroup)

    def describe(self) -> dict[str, str]:
        out = {"mechanism": self.mechanism, "instance": self.instance, "why": self.why}
        if self.cgroup_dir is not None:
            out["cgroup_dir"] = str(self.cgroup_dir)
        return out

    def sweep_earlier_runs(self, limit_s: float) -> list[int]:
        """SIGKILL what any earlier run of this instance left; call before spawning anything."""
        groups = sweep.run_cgroups(self.cgroup_dir, "") if self.cgroup_dir else []
        return sweep.sweep(self.prefix, groups, limit_s)

    def earlier_members(self) -> list[int]:
        groups = sweep.run_cgroups(self.cgroup_dir, "") if self.cgroup_dir else []
        pids = {*sweep.marked_pids(self.prefix)}
        pids.update(pid for group in groups for pid in sweep.cgroup_pids(group))
        return sorted(pids)

    def close(self) -> None:
        """At shutdown, once every replica has stopped: remove this run's empty cgroups."""
        if self.cgroup_dir is not None:
            for group in sweep.run_cgroups(self.cgroup_dir, f"{self.run}-"):
                sweep.cgroup_remove(group)
            with contextlib.suppress(OSError):
                self.cgroup_dir.rmdir()


def _new_run() -> str:
    return uuid.uuid4().hex[:8]


def choose(state_dir: Path, mode: str = "auto", cgroup_dir: str = "") -> Containment:
    """Pick the mechanism; raises ConfigError when `mode` demands one this host lacks."""
    if mode not in MECHANISMS:
        raise ConfigError(f"containment: expected one of {', '.join(MECHANISMS)}, got {mode!r}")
    instance = instance_id(state_dir)
    if mode == "marker":
        return Containment.marker_only(instance, "containment = marker")
    base = Path(cgroup_dir) if cgroup_dir else own_cgroup()
    problem = "no cgroup v2 hierarchy is mounted" if base is None else None
    if base is not None:
        problem = probe_cgroup(base / f"modeld-{instance}")
    if problem is None and base is not None:
        return Containment("cgroup", instance, _new_run(), base / f"modeld-{instance}", "usable")
    if mode == "cgroup":
        raise ConfigError(f"containment = cgroup, but {problem}")
    return Containment.marker_only(instance, f"cgroup unusable: {problem}")


def choose_soon(state_dir: Path, mode: str = "auto", cgroup_dir: str = "") -> Future[Containment]:
    """`choose`, begun now in a thread of its own: the future holds its answer or its error.

    The probe mostly waits on the kernel (moving a process into a cgroup waits out an
    RCU grace period, up to ~20 ms), so `modeld serve` starts it before importing the
    daemon and takes the answer where the daemon would have chosen. The thread is not
    a daemon thread: an exit meanwhile waits for the probe to clean up after itself.
    """
    chosen: Future[Containment] = Future()

    def probe() -> None:
        try:
            chosen.set_result(choose(state_dir, mode, cgroup_dir))
        except Exception as exc:
            chosen.set_exception(exc)

    threading.Thread(target=probe, name="containment-probe").start()
    return chosen


def own_cgroup(self_cgroup: Path = _SELF_CGROUP, mountinfo: Path = _MOUNTINFO) -> Path | None:
    """The directory of this process's cgroup v2, or None without a cgroup v2 mount."""
    try:
        lines = self_cgroup.read_text().splitlines()
        mounts = mountinfo.read_text().splitlines()
    except OSError:
        return None
    path = next((ln[3:] for ln in lines if ln.startswith("0::")), None)
    if path is None:
        return None
    for mount in mounts:
        fields, _, rest = mount.partition(" - ")
        parts = fields.split()
        if rest.split()[:1] != ["cgroup2"] or len(parts) < 5:
            continue
        root, point = parts[3], parts[4]
        if path == root or path.startswith(root.rstrip("/") + "/"):
            return Path(point) / path[len(root) :].lstrip("/")
    return None


def probe_cgroup(instance_dir: Path) -> str | None:
    """Try exactly what the mechanism needs: a sub-cgroup, moving a process in, cgroup.kill.

    Returns None when all of it works, else what failed.
    """
    probe = instance_dir / f"probe-{_new_run()}"
    try:
        probe.mkdir(parents=True)
    except OSError as exc:
        return f"cannot create a cgroup under {instance_dir.parent}: {exc.strerror}"
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        return _probe_with(probe, proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        with contextlib.suppress(OSError):
            probe.rmdir()


def _probe_with(probe: Path, pid: int) -> str | None:
    if not (probe / "cgroup.kill").exists():
        return "the kernel has no cgroup.kill (Linux 5.14 or later is needed)"
    try:
        (probe / "cgroup.procs").write_text(str(pid))
    except OSError as exc:
        return f"cannot move a process into {probe}: {exc.strerror}"
    if pid not in sweep.cgroup_pids(probe):
        return f"a process moved into {probe} is not listed there"
    return None


class Sentinel:
    """The process that kills this run's boxes when modeld dies (see sweep.py).

    It reads a pipe whose write end only this process holds (close-on-exec, so no
    backend inherits it): EOF means modeld is gone, however it went.
    """

    def __init__(self, containment: Containment, python: str = sys.executable) -> None:
        argv = [python, "-I", "-S", sweep.__file__, "--prefix", containment.run_prefix]
        if containment.cgroup_dir is not None:
            argv += ["--cgroup-dir", str(containment.cgroup_dir), "--run", f"{containment.run}-"]
        self._popen = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self._popen.pid

    async def close(self, limit_s: float = 10.0) -> int | None:
        """Tell it modeld is leaving (EOF) and wait for it; it sweeps what is left, if any."""
        if self._popen.stdin is not None:
            self._popen.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            return await asyncio.to_thread(self._popen.wait, limit_s)
        return None


class InstanceLock:
    """One modeld per state_dir: the clean-up at start kills whatever carries this
    instance's marker, so a second daemon on the same state_dir must not start.

    An flock on `<state_dir>/modeld.lock`, held for the daemon's life (close-on-exec,
    so no backend inherits it); the kernel drops it however the daemon dies.
    """

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / "modeld.lock"
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode("ascii", "replace").strip()
            os.close(self._fd)
            raise ConfigError(
                f"state_dir {state_dir}: another modeld (pid {holder or '?'}) is using it"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
