"""Finding and killing every process a modeld instance started, however far it strayed.

Two ways to recognise a backend's descendants, whatever they did to their
process group or parent (setsid(), double fork, reparenting to init):

- the **marker**: every backend is started with `MODELD_OWNER=INSTANCE/RUN/REPLICA`
  in its environment, which every descendant inherits. INSTANCE names the modeld
  instance (a hash of its state_dir), RUN one life of it (a fresh id at every
  start), REPLICA the replica. /proc/PID/environ shows the environment a process
  was exec'd with, so a process that later unsets the variable is still found;
  only one that execs itself with a new environment escapes the marker.
- the **cgroup**: with the cgroup mechanism each replica's processes live in a
  cgroup v2 of their own, `<root>/modeld-INSTANCE/RUN-REPLICA`; membership survives
  any reparenting, and `cgroup.kill` kills every member at once.

A process is never matched by its pid alone, its command line, or its user: an
unrelated process with the same command line, or a backend of another modeld
(another state_dir, so another INSTANCE), carries no marker of ours.

This module uses the standard library only, because it is also the **sentinel**:
`python -I -S sweep.py --prefix INSTANCE/RUN/ [--cgroup-prefix DIR/RUN-]` is started
by modeld in a session of its own, with a pipe as stdin whose other end only
modeld holds. When modeld dies, however it dies (even SIGKILL), the pipe reads
EOF and the sentinel kills everything its run started, then exits. On a clean
shutdown modeld has stopped everything already and the sentinel finds nothing.
"""

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path

MARKER = "MODELD_OWNER"
_PROC = Path("/proc")
# A process that forks while being killed makes a new one; sweep again, a bounded number of times.
SWEEP_ROUNDS = 50


def marker_value(instance: str, run: str, replica: str) -> str:
    return f"{instance}/{run}/{replica}"


def matches(owner: str | None, pattern: str) -> bool:
    """`pattern` ending in "/" (an instance, a run) matches every marker below it;
    any other (a replica's marker) matches itself only: r1 is not r10."""
    if owner is None:
        return False
    return owner.startswith(pattern) if pattern.endswith("/") else owner == pattern


def owner_of(pid: int) -> str | None:
    """The MODELD_OWNER value a process was started with; None if it has none or is gone."""
    try:
        raw = (_PROC / str(pid) / "environ").read_bytes()
    except OSError:  # gone, a kernel thread, or another user's process: none of ours
        return None
    key = MARKER.encode() + b"="
    for entry in raw.split(b"\0"):
        if entry.startswith(key):
            return entry[len(key) :].decode("utf-8", "replace")
    return None


def is_zombie(pid: int) -> bool:
    try:
        raw = (_PROC / str(pid) / "stat").read_bytes()
    except OSError:
        return True
    fields = raw.rpartition(b")")[2].split()
    return not fields or fields[0] in (b"Z", b"X")


def marked_pids(prefix: str) -> list[int]:
    """One scan of /proc: live processes whose marker `matches` `prefix` (never this one)."""
    me = os.getpid()
    out = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        if matches(owner_of(int(entry.name)), prefix) and not is_zombie(int(entry.name)):
            out.append(int(entry.name))
    return out


def signal_marked(pids: Iterable[int], prefix: str, sig: int) -> None:
    """Signal each pid through a pidfd, after checking that the pidfd's process is marked.

    Between the scan and the signal a pid may have been reused; the pidfd pins one
    process, and its marker is read again before the signal is sent.
    """
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            if matches(owner_of(pid), prefix):
                signal.pidfd_send_signal(fd, sig)
        except OSError:  # gone, or no longer ours to signal
            pass
        finally:
            os.close(fd)


def cgroup_pids(path: Path) -> list[int]:
    """Live members of a cgroup and of any cgroup below it (read from cgroup.procs)."""
    out: list[int] = []
    for procs in path.glob("**/cgroup.procs"):
        with contextlib.suppress(OSError):
            out.extend(int(line) for line in procs.read_text().split())
    return [pid for pid in dict.fromkeys(out) if not is_zombie(pid)]


def cgroup_kill(path: Path) -> None:
    """SIGKILL every member of the cgroup and of its descendants, in one write."""
    with contextlib.suppress(FileNotFoundError):
        (path / "cgroup.kill").write_text("1")


def cgroup_remove(path: Path) -> bool:
    """Remove an empty cgroup (children first); False if something still lives in it."""
    if not path.is_dir():
        return True
    for parent, dirs, _ in os.walk(path, topdown=False):
        for name in dirs:
            with contextlib.suppress(OSError):
                (Path(parent) / name).rmdir()
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def sweep(prefix: str, cgroups: Iterable[Path], limit_s: float = 5.0) -> list[int]:
    """SIGKILL everything marked with `prefix` or inside `cgroups`, until nothing is left.

    Returns what still lived at the deadline. Used by the sentinel and at daemon start.
    """
    groups = list(cgroups)
    deadline = time.monotonic() + limit_s
    left: list[int] = []
    for _ in range(SWEEP_ROUNDS):
        for group in groups:
            cgroup_kill(group)
        marked = marked_pids(prefix)
        signal_marked(marked, prefix, signal.SIGKILL)
        left = sorted({*marked, *(pid for group in groups for pid in cgroup_pids(group))})
        if not left or time.monotonic() >= deadline:
            break
        # SIGKILL takes effect at once, but the exit itself takes a moment.
        time.sleep(0.01)
    for group in groups:
        cgroup_remove(group)
    return left


def run_cgroups(cgroup_dir: Path, run_prefix: str) -> list[Path]:
    """The replica cgroups of one run (or of every run, with an empty prefix)."""
    with contextlib.suppress(OSError):
        return [p for p in cgroup_dir.iterdir() if p.is_dir() and p.name.startswith(run_prefix)]
    return []


def _sentinel(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="modeld-sentinel")
    parser.add_argument("--prefix", required=True, help="MODELD_OWNER prefix of this run")
    parser.add_argument("--cgroup-dir", default="", help="the instance's cgroup directory")
    parser.add_argument("--run", default="", help="this run's cgroup name prefix")
    args = parser.parse_args(argv)
    # Only EOF on stdin (modeld gone) ends the wait; a terminal's signals are not for us.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    while sys.stdin.buffer.read(65536):
        pass
    groups = run_cgroups(Path(args.cgroup_dir), args.run) if args.cgroup_dir else []
    left = sweep(args.prefix, groups)
    if args.cgroup_dir:
        # Only if no other run of the instance uses it (a restarted modeld recreates it).
        with contextlib.suppress(OSError):
            Path(args.cgroup_dir).rmdir()
    if left:
        sys.stderr.write(f"modeld sentinel: pids {left} survived SIGKILL\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_sentinel(sys.argv[1:]))
