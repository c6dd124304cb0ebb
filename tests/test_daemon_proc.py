"""The harness's own check that no backend outlives the daemon can fail."""

import os
import signal
import subprocess
import sys

from daemon_proc import _stat_fields, sessions_of, wait_pids_gone

START = 19
WORKER = (
    "import subprocess, sys; print(subprocess.Popen(['sleep', '60']).pid, flush=True); "
    "sys.stdin.read()"
)


def _start_time(pid: int) -> int:
    fields = _stat_fields(pid)
    assert fields is not None
    return int(fields[START])


async def test_a_backend_and_a_worker_left_in_its_session_are_found() -> None:
    backend = subprocess.Popen(
        [sys.executable, "-c", WORKER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert backend.stdout is not None
        worker = int(backend.stdout.readline())
        started = {backend.pid: _start_time(backend.pid)}
        assert sorted(sessions_of(started)) == sorted([backend.pid, worker])
        # The backend gone, its worker still counts: it is in the backend's session.
        os.kill(backend.pid, signal.SIGKILL)
        backend.wait()
        assert sessions_of(started) == [worker]
        assert sessions_of({worker: _start_time(worker) + 1}) == [], (
            "a pid now held by a newer process must not count"
        )
    finally:
        os.killpg(backend.pid, signal.SIGKILL)
        backend.wait()
    assert await wait_pids_gone([worker], 5) == []
    assert sessions_of(started) == []
