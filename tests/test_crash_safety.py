"""Crash safety of the real daemon: kill -9 mid-burst, a full disk, a database not its own.

- SIGKILL during a burst of PutModel / UpdateSettings / Load, twenty times in a
  row on one state directory: after each restart every acknowledged write is
  there, the database is intact, and no backend of an earlier life survives
  (they die by PR_SET_PDEATHSIG; the restart's orphan sweep is the second net).
- The registry's disk fills up: writes fail with UNAVAILABLE and say why, Route
  keeps serving READY replicas, and writes succeed again once there is room.
- A corrupt or foreign database: the daemon exits 2 with a clear message and
  leaves the file byte for byte as it was.
"""

import asyncio
import contextlib
import errno
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from daemon_proc import DaemonProc, start_daemon, wait_pids_gone, write_config
from faults import echo_backend_toml, integrity, marked_pids, new_marker
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.spec import ModelSpec
from modeld.storage.registry import Registry

KILL_ROUNDS = 20
PUTS_PER_ROUND = 12
PDEATHSIG_WAIT_S = 5.0


def kill_loop_config(marker: str) -> str:
    return (
        '[routing]\nlease_ttl = "30s"\n'
        + echo_backend_toml("echo", marker)
        + '[models.e1]\nbackend = "echo"\n[models.e2]\nbackend = "echo"\n'
    )


@dataclass
class Acked:
    """What the daemon acknowledged, across all of its lives."""

    models: set[str] = field(default_factory=set)
    max_loaded: int = 0
    max_loaded_sent: int = 0
    # Rounds in which the kill cut PutModels off: the burst really was in flight.
    interrupted: int = 0


def _kill9(d: DaemonProc) -> None:
    # os.kill, not send_signal: send_signal polls first, and that poll could reap
    # the child before asyncio's watcher does, which then reports exit code 255.
    with contextlib.suppress(ProcessLookupError):
        os.kill(d.proc.pid, signal.SIGKILL)


async def _puts(d: DaemonProc, names: list[str], acked: Acked, kill_after: int) -> None:
    async def put(name: str) -> None:
        await d.stub.PutModel(pb.PutModelRequest(spec=pb.ModelSpec(name=name, backend="echo")))
        acked.models.add(name)
        if len(acked.models & set(names)) >= kill_after:
            _kill9(d)

    await asyncio.gather(*(put(n) for n in names), return_exceptions=True)
    if not set(names) <= acked.models:
        acked.interrupted += 1


async def _settings_chain(d: DaemonProc, acked: Acked, first: int) -> None:
    for value in range(first, first + 50):
        acked.max_loaded_sent = value
        try:
            await d.stub.UpdateSettings(
                pb.UpdateSettingsRequest(settings=pb.Settings(max_loaded=value))
            )
        except grpc.aio.AioRpcError:
            return
        acked.max_loaded = value


async def _loads(d: DaemonProc) -> list[int]:
    replies = await asyncio.gather(
        *(d.stub.Load(pb.LoadRequest(model=m), timeout=20) for m in ("e1", "e2")),
        return_exceptions=True,
    )
    return [
        r.pid for reply in replies if isinstance(reply, pb.LoadResponse) for r in reply.replicas
    ]


async def _check_restart(d: DaemonProc, acked: Acked, db: Path) -> None:
    listed = {m.name for m in (await d.stub.ListModels(pb.ListModelsRequest())).models}
    missing = acked.models - listed
    assert not missing, f"acknowledged PutModel lost after kill -9: {sorted(missing)}"
    current = (await d.stub.GetSettings(pb.GetSettingsRequest())).max_loaded
    assert acked.max_loaded <= current <= max(acked.max_loaded_sent, 1), (acked, current)
    assert integrity(db) == "ok"


async def _no_survivors(marker: str, known: list[int]) -> None:
    """Every backend of the killed daemon is gone: the ones we knew, and any other."""
    assert await wait_pids_gone(known, PDEATHSIG_WAIT_S) == [], "backends survived kill -9"
    late = marked_pids(marker)
    assert await wait_pids_gone(late, PDEATHSIG_WAIT_S) == [], f"late backends survived: {late}"


@pytest.mark.long
async def test_kill_9_mid_burst_loses_nothing_acknowledged(tmp_path: Path) -> None:
    marker = new_marker()
    config, addr = write_config(tmp_path, kill_loop_config(marker))
    db = tmp_path / "state" / "modeld.db"
    acked = Acked()
    rng = random.Random(7)
    orphaned = 0
    for round_no in range(KILL_ROUNDS):
        d = await start_daemon(config, addr)
        try:
            await _check_restart(d, acked, db)
            assert marked_pids(marker) == [], "a backend of an earlier life is running"
            known: list[int] = []
            if round_no % 2 == 0:
                known += await _loads(d)
            names = [f"m{round_no}-{k}" for k in range(PUTS_PER_ROUND)]
            burst: list[Awaitable[object]] = [
                _puts(d, names, acked, rng.randint(1, PUTS_PER_ROUND - 1)),
                _settings_chain(d, acked, 10 + round_no * 50),
            ]
            if round_no % 2 == 1:
                burst.append(_loads(d))
            await asyncio.gather(*burst, return_exceptions=True)
            known += marked_pids(marker)
            _kill9(d)
            code = await asyncio.wait_for(d.proc.wait(), 10)
            assert code == -signal.SIGKILL, (round_no, code)
        finally:
            await d.close()
        await _no_survivors(marker, known)
        orphaned += len(set(known))
    d = await start_daemon(config, addr)
    try:
        await _check_restart(d, acked, db)
        assert len(acked.models) >= KILL_ROUNDS
        assert acked.interrupted >= KILL_ROUNDS // 2, acked
        print(
            f"\n{KILL_ROUNDS} x kill -9: {len(acked.models)} PutModels acknowledged, all kept; "
            f"{acked.interrupted} bursts cut off mid-flight; {orphaned} backends of killed "
            f"daemons, all gone within {PDEATHSIG_WAIT_S:.0f}s; integrity_check ok after each"
        )
    finally:
        assert await d.stop() == 0


# A full disk: the state directory is a small tmpfs of the daemon's own, mounted in a
# mount namespace (and, without root, a user namespace) that dies with it.


def _unshare_prefix() -> list[str]:
    flags = ["--mount"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--mount"]
    prefix = ["unshare", *flags, "--propagation", "private"]
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    probe = subprocess.run(
        [*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a namespace here: {probe.stderr.decode()[:200]}")
    return prefix


@pytest.fixture
async def small_disk_daemon(tmp_path: Path) -> AsyncIterator[tuple[DaemonProc, Path, str]]:
    prefix = _unshare_prefix()
    marker = new_marker()
    body = echo_backend_toml("echo", marker) + '[models.echo]\nbackend = "echo"\n'
    body += '[models.other]\nbackend = "echo"\n'
    config, addr = write_config(tmp_path, body)
    state = tmp_path / "state"
    state.mkdir()
    script = 'mount -t tmpfs -o size=8m tmpfs "$0" && exec "$@"'
    proc = await asyncio.create_subprocess_exec(
        *prefix,
        "sh",
        "-c",
        script,
        str(state),
        sys.executable,
        "-m",
        "modeld.cli.main",
        "serve",
        "--config",
        str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("MODELD_")},
    )
    d = DaemonProc(proc, addr, config)
    try:
        await d.wait_serving()
        # The daemon's view of its state directory, from outside its mount namespace.
        yield d, Path(f"/proc/{proc.pid}/root{state}"), marker
    finally:
        if proc.returncode is None:
            await d.stop()
        await d.close()


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    chunk = 1 << 20
    with filler.open("wb", buffering=0) as fh:
        while chunk >= 512:
            try:
                fh.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                chunk //= 2
    return filler


async def _code(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def test_full_disk_fails_writes_keeps_routing_and_recovers(
    small_disk_daemon: tuple[DaemonProc, Path, str],
) -> None:
    d, state, marker = small_disk_daemon
    loaded = await d.stub.Load(pb.LoadRequest(model="echo"), timeout=30)
    ready_pid = loaded.replicas[0].pid
    before = pb.ModelSpec(name="before", backend="echo")
    await d.stub.PutModel(pb.PutModelRequest(spec=before))
    filler = _fill(state)

    code, details = await _code(
        d.stub.PutModel(pb.PutModelRequest(spec=pb.ModelSpec(name="during", backend="echo")))
    )
    assert code is grpc.StatusCode.UNAVAILABLE, details
    assert "could not save" in details and "full" in details, details
    settings = pb.UpdateSettingsRequest(settings=pb.Settings(max_loaded=7))
    code, details = await _code(d.stub.UpdateSettings(settings))
    assert code is grpc.StatusCode.UNAVAILABLE, details
    assert (await d.stub.GetSettings(pb.GetSettingsRequest())).max_loaded == 0
    for _ in range(20):
        lease = await d.stub.Route(pb.RouteRequest(model="echo"), timeout=2)
        assert lease.replica_id == loaded.replicas[0].id
        assert (await d.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id))).released
    code, details = await _code(d.stub.Load(pb.LoadRequest(model="other"), timeout=30))
    assert code is grpc.StatusCode.UNAVAILABLE, details
    assert "could not save" in details, details
    # The start that could not be recorded was undone: only the READY replica's
    # process (a start's launcher may still be exiting) carries the marker.
    assert await wait_pids_gone([p for p in marked_pids(marker) if p != ready_pid], 5) == []

    filler.unlink()
    await d.stub.PutModel(pb.PutModelRequest(spec=pb.ModelSpec(name="after", backend="echo")))
    assert (await d.stub.UpdateSettings(settings)).max_loaded == 7
    names = {m.name for m in (await d.stub.ListModels(pb.ListModelsRequest())).models}
    assert {"before", "after"} <= names and "during" not in names
    assert integrity(state / "modeld.db") == "ok"
    assert any(e.get("event") == "registry_write_failed" for e in d.log)
    assert await d.stop() == 0


# A database that is not (or no longer) a modeld registry.


def _garbage(path: Path) -> None:
    path.write_bytes(b"definitely not sqlite\n" * 500)


def _foreign(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    db.executemany("INSERT INTO customers (name) VALUES (?)", [(f"c{i}",) for i in range(200)])
    db.commit()
    db.close()


async def _damaged(path: Path) -> None:
    """A registry of ours with a page in the middle overwritten."""
    registry = await Registry.open(path)
    for i in range(300):
        await registry.put_model(
            ModelSpec(name=f"m{i}", backend="echo", options=(("k", "v" * 999),))
        )
    await registry.close()
    data = bytearray(path.read_bytes())
    data[3 * 4096 : 3 * 4096 + 2048] = b"\x55" * 2048
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("garbage", "not a SQLite database"),
        ("foreign", "another program"),
        ("damaged", "refusing to touch it"),
    ],
)
async def test_a_database_not_our_own_is_refused_untouched(
    tmp_path: Path, kind: str, needle: str
) -> None:
    config, addr = write_config(tmp_path, "")
    db = tmp_path / "state" / "modeld.db"
    db.parent.mkdir()
    if kind == "garbage":
        _garbage(db)
    elif kind == "foreign":
        _foreign(db)
    else:
        await _damaged(db)
    before = db.read_bytes()
    d = await start_daemon(config, addr, wait=False)
    try:
        assert await asyncio.wait_for(d.proc.wait(), 20) == 2
    finally:
        await d.close()
    message = "\n".join(d.raw)
    assert f"modeld: {db}" in message and needle in message, message[-2000:]
    assert db.read_bytes() == before
    assert sorted(p.name for p in db.parent.iterdir()) == ["modeld.db"]
