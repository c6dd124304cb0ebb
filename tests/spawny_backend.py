"""A backend that leaves descendants everywhere, then becomes the echo backend.

    python spawny_backend.py --addr HOST:PORT        (needs SPAWNY_DIR in its environment)

Before it execs `python -m modeld.backends.echo` (same pid, same argv after the
script) it starts, as vLLM workers and shell-wrapped backends do:
  (a) a child, in its process group;
  (b) a grandchild, through a middle process that stays;
  (c) a worker that double-forks, calls setsid() (a session and group of its own,
      reparented away from the backend) and ignores SIGTERM.
It writes {"backend": pid, "child": ..., "middle": ..., "grandchild": ..., "worker": ...}
to SPAWNY_DIR/<backend pid>.json (atomically) so the test knows every pid.

`python spawny_backend.py sleep` is the command line of (a) and of the grandchild;
a test starts the same command line on its own as a decoy.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable
HERE = str(Path(__file__).resolve())


def _sleep() -> None:
    time.sleep(3600)


def _middle(fd: int) -> None:
    grandchild = subprocess.Popen([PY, HERE, "sleep"])
    os.write(fd, str(grandchild.pid).encode())
    os.close(fd)
    _sleep()


def _worker() -> int:
    """Double fork + setsid; the worker ignores SIGTERM. Returns the worker's pid."""
    read, write = os.pipe()
    first = os.fork()
    if first == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # kept across exec
            os.write(write, str(os.getpid()).encode())
            os.execv(PY, [PY, HERE, "sleep"])
        os._exit(0)
    os.waitpid(first, 0)
    os.close(write)
    pid = int(os.read(read, 64))
    os.close(read)
    return pid


def _backend(argv: list[str]) -> None:
    out = Path(os.environ["SPAWNY_DIR"])
    child = subprocess.Popen([PY, HERE, "sleep"])
    read, write = os.pipe()
    middle = subprocess.Popen([PY, HERE, "middle", str(write)], pass_fds=[write])
    os.close(write)
    grandchild = int(os.read(read, 64))
    os.close(read)
    pids = {
        "backend": os.getpid(),
        "child": child.pid,
        "middle": middle.pid,
        "grandchild": grandchild,
        "worker": _worker(),
    }
    tmp = out / f".{os.getpid()}.tmp"
    tmp.write_text(json.dumps(pids))
    tmp.replace(out / f"{os.getpid()}.json")
    os.execv(PY, [PY, "-m", "modeld.backends.echo", *argv])


if __name__ == "__main__":
    if sys.argv[1:2] == ["sleep"]:
        _sleep()
    elif sys.argv[1:2] == ["middle"]:
        _middle(int(sys.argv[2]))
    else:
        _backend(sys.argv[1:])
