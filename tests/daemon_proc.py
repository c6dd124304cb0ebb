"""Start the real daemon (`modeld serve`) as a subprocess in a test.

    async with running_daemon(tmp_path, extra_toml) as d:
        reply = await d.stub.ListModels(pb.ListModelsRequest())

The config is written to a file under tmp_path; the daemon's JSON log lines are
drained continuously into `d.log` (parsed dicts), and readiness is awaited on
the standard gRPC health check with a deadline.

Every backend the daemon ran is remembered (its "spawned pid N" log lines, and
the daemon's descendants when it is stopped): `d.stop()` fails the test when any
of them, or any process of their sessions, outlives the daemon, and
`running_daemon` also fails it when the daemon did not exit with `exit_code`.
"""

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from backend_proc import free_port
from modeld._proto.modeld.v1 import modeld_pb2_grpc

# After the daemon exits, how long its backends may take to go (PR_SET_PDEATHSIG
# kills them asynchronously when the daemon itself was killed).
BACKENDS_GONE_S = 5.0
_SPAWNED = re.compile(r"spawned pid (\d+)")

# The demo backend and model most end-to-end tests run; append to it for more.
ECHO_CATALOG = """
[backends.echo]
command = ["{python}", "-m", "modeld.backends.echo", "--addr", "{addr}"]
stop_grace = "2s"
[models.echo]
backend = "echo"
"""


def write_config(tmp_path: Path, body: str, port: int | None = None) -> tuple[Path, str]:
    port = port or free_port()
    addr = f"127.0.0.1:{port}"
    (tmp_path / "models").mkdir(exist_ok=True)
    text = (
        f'listen = ["{addr}"]\nstate_dir = "{tmp_path / "state"}"\n'
        f'models_dir = "{tmp_path / "models"}"\nlog_level = "debug"\nshutdown_grace = "5s"\n' + body
    )
    path = tmp_path / "modeld.toml"
    path.write_text(text)
    return path, addr


class DaemonProc:
    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        addr: str,
        config: Path,
        creds: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.proc = proc
        self.addr = addr
        self.config = config
        self.log: list[dict[str, Any]] = []
        self.raw: list[str] = []
        # Every backend process this daemon is known to have started: pid -> start time
        # (pids are reused quickly on a busy machine, pid_max is often 32768).
        self.backends: dict[int, int] = {}
        self._changed = asyncio.Condition()
        self._pump = asyncio.create_task(self._drain())
        self.channel = (
            grpc.aio.secure_channel(addr, creds) if creds else grpc.aio.insecure_channel(addr)
        )
        self.stub = modeld_pb2_grpc.ModelControlStub(self.channel)  # type: ignore[no-untyped-call]

    async def _drain(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.raw.append(line)
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                self.log.append(entry)
                self._note_spawn(entry)
            async with self._changed:
                self._changed.notify_all()

    async def wait_log(
        self, match: Callable[[dict[str, Any]], bool], limit_s: float = 10.0
    ) -> dict[str, Any]:
        async def seen() -> dict[str, Any]:
            async with self._changed:
                while True:
                    hit = next((e for e in self.log if match(e)), None)
                    if hit is not None:
                        return hit
                    if self.proc.returncode is not None:
                        raise AssertionError(
                            "daemon exited; log tail:\n" + "\n".join(self.raw[-20:])
                        )
                    await self._changed.wait()

        return await asyncio.wait_for(seen(), limit_s)

    async def wait_serving(self, limit_s: float = 20.0) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)  # type: ignore[no-untyped-call]
        exited = asyncio.ensure_future(self.proc.wait())
        check = asyncio.ensure_future(
            health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=limit_s)
        )
        done, _ = await asyncio.wait({exited, check}, return_when=asyncio.FIRST_COMPLETED)
        if check not in done:
            check.cancel()
            raise AssertionError("daemon exited before serving:\n" + "\n".join(self.raw[-30:]))
        exited.cancel()
        assert check.result().status == health_pb2.HealthCheckResponse.SERVING

    def _note_spawn(self, entry: dict[str, Any]) -> None:
        spawned = _SPAWNED.fullmatch(str(entry.get("reason", "")))
        if entry.get("event") == "replica_state" and spawned:
            self._note(int(spawned[1]))

    def _note_descendants(self) -> None:
        """Backends whose spawn was not logged (a start retried on another port)."""
        for pid in descendants(self.proc.pid):
            self._note(pid)

    def _note(self, pid: int) -> None:
        fields = _stat_fields(pid)
        if fields is not None and pid not in self.backends:
            self.backends[pid] = int(fields[_START])

    async def stop(self, sig: int = signal.SIGTERM, limit_s: float = 20.0) -> int:
        """Signal the daemon, wait for its exit code, and fail if a backend outlives it."""
        if self.proc.returncode is None:
            self._note_descendants()
            self.proc.send_signal(sig)
        try:
            code = await asyncio.wait_for(self.proc.wait(), limit_s)
        except TimeoutError:
            raise AssertionError(
                f"the daemon did not exit within {limit_s}s of signal {sig}; log tail:\n"
                + "\n".join(self.raw[-30:])
            ) from None
        finally:
            await self.close()
        survivors = await self.surviving_backends()
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not survivors, f"backend processes outlived the daemon: {survivors}"
        return code

    async def surviving_backends(self) -> list[int]:
        """Processes of the daemon's backends (their sessions included) still alive
        once BACKENDS_GONE_S has passed since the daemon exited."""
        return await wait_pids_gone(sessions_of(self.backends), BACKENDS_GONE_S)

    async def close(self) -> None:
        await self.channel.close()
        if self.proc.returncode is None:
            self._note_descendants()
            self.proc.kill()
            await self.proc.wait()
        await self._pump


async def start_daemon(
    config: Path,
    addr: str,
    *args: str,
    wait: bool = True,
    env: Mapping[str, str] | None = None,
    creds: grpc.ChannelCredentials | None = None,
) -> DaemonProc:
    """`env` adds variables (NOTIFY_SOCKET, ...) to the daemon's; `creds` makes `d.channel`
    a TLS channel, for a daemon with tls_cert."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MODELD_")}
    full_env = {**base, **(env or {})}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "modeld.cli.main",
        "serve",
        "--config",
        str(config),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=full_env,
    )
    daemon = DaemonProc(proc, addr, config, creds)
    if wait:
        try:
            await daemon.wait_serving()
        except BaseException:
            await daemon.close()
            raise
    return daemon


@contextlib.asynccontextmanager
async def running_daemon(
    tmp_path: Path, body: str = "", port: int | None = None, *, exit_code: int = 0
) -> AsyncIterator[DaemonProc]:
    """A serving daemon; at the end (unless the test failed) it is stopped with
    SIGTERM, must exit with `exit_code` and leave no backend process behind."""
    config, addr = write_config(tmp_path, body, port)
    daemon = await start_daemon(config, addr)
    try:
        yield daemon
        code = await daemon.stop()
        assert code == exit_code, (
            f"the daemon exited with {code}, not {exit_code}; log tail:\n"
            + "\n".join(daemon.raw[-30:])
        )
    finally:
        await daemon.close()


# Indexes into /proc/PID/stat after the command name: state, ppid, pgrp, session, starttime.
_STATE, _PPID, _PGRP, _SESSION, _START = 0, 1, 2, 3, 19


def starts_recorded(folder: Path, model: str) -> int:
    """STARTING events in the registry of the daemon configured in `folder` (as
    `write_config` lays it out): one per spawned replica, written before the spawn."""
    db = sqlite3.connect(f"file:{folder / 'state' / 'modeld.db'}?mode=ro", uri=True)
    try:
        row = db.execute(
            "SELECT count(*) FROM events WHERE model = ? AND to_state = 'STARTING'", (model,)
        ).fetchone()
    finally:
        db.close()
    return int(row[0])


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def descendants(root: int) -> set[int]:
    """Every process below `root` in the process tree now."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        fields = _stat_fields(pid)
        if fields is not None:
            children.setdefault(int(fields[_PPID]), []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def sessions_of(started: dict[int, int]) -> list[int]:
    """Live processes that are one of `started` (pid -> start time), or in a process
    group or session one of them leads (every backend leads its own session and its
    workers stay in it). A pid now held by a newer process names someone else: Linux
    reuses a pid only once no group or session of that number is left."""
    if not started:
        return []
    table = {pid: fields for pid in _all_pids() if (fields := _stat_fields(pid)) is not None}
    ours = {
        pid
        for pid, start in started.items()
        if pid not in table or int(table[pid][_START]) == start
    }
    return [
        pid
        for pid, fields in table.items()
        if fields[_STATE] != "Z"
        and (pid in ours or int(fields[_PGRP]) in ours or int(fields[_SESSION]) in ours)
    ]


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        stat = Path(f"/proc/{pid}/stat")
        with contextlib.suppress(OSError):
            if stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(pid)
    return alive


async def wait_pids_gone(pids: list[int], limit_s: float) -> list[int]:
    """Wait (on pidfds, not by polling) until every pid has exited; returns survivors."""
    loop = asyncio.get_running_loop()
    waits = []
    fds = []
    for pid in pids_alive(pids):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        fds.append(fd)
        done = loop.create_future()
        loop.add_reader(fd, lambda f=done: f.done() or f.set_result(None))
        waits.append(done)
    try:
        if waits:
            await asyncio.wait(waits, timeout=limit_s)
    finally:
        for fd in fds:
            loop.remove_reader(fd)
            os.close(fd)
    return pids_alive(pids)
