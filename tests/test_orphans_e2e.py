"""No orphans, with real processes: a backend that leaves a child, a grandchild and a
double-forked setsid() worker that ignores SIGTERM (tests/spawny_backend.py).

- `kill -9` of modeld: the sentinel kills every descendant;
- `kill -9` of modeld and of its sentinel: a restarted modeld has killed them by the
  time it reports SERVING, and left alone a decoy with the same command line and a
  second modeld (own state_dir) with its backends;
- Unload, idle eviction and shutdown: every descendant is gone before STOPPED is seen.

Each runs with the cgroup mechanism (where this machine allows it) and the marker one.
"""

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from daemon_proc import DaemonProc, pids_alive, start_daemon, wait_pids_gone, write_config
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.errors import ConfigError
from modeld.supervisor import sweep
from modeld.supervisor.containment import choose

SPAWNY = Path(__file__).with_name("spawny_backend.py")
ROLES = ("backend", "child", "middle", "grandchild", "worker")
# Generous: a loaded 2-core CI machine. The figure (well under 2 s) is in `make bench`.
GONE_S = 10.0
LOAD_S = 60.0


def _cgroup_allowed() -> bool:
    try:
        choose(Path("/tmp/modeld-cgroup-check"), "cgroup").close()
    except ConfigError:
        return False
    return True


MECHANISMS = [
    pytest.param(
        "cgroup",
        marks=pytest.mark.skipif(not _cgroup_allowed(), reason="no writable cgroup v2 here"),
    ),
    "marker",
]


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path: Path) -> Iterator[None]:
    """Should a test fail halfway, what its backends started must not outlive it."""
    yield
    for record in tmp_path.glob("**/spawned/*.json"):
        for pid in json.loads(record.read_text()).values():
            if sweep.owner_of(pid) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def body(mechanism: str, spawn_dir: Path, model_extra: str = "", top: str = "") -> str:
    spawn_dir.mkdir(exist_ok=True)
    return (
        f'containment = "{mechanism}"\n{top}'
        "[backends.spawny]\n"
        f'command = ["{{python}}", "{SPAWNY}", "--addr", "{{addr}}"]\n'
        f'env = {{ SPAWNY_DIR = "{spawn_dir}" }}\n'
        'stop_grace = "1s"\n'
        '[models.spawny]\nbackend = "spawny"\nmax_replicas = 2\n' + model_extra
    )


@contextlib.asynccontextmanager
async def daemon(tmp_path: Path, text: str) -> AsyncIterator[DaemonProc]:
    """A daemon that a test may kill; whatever is left running is stopped at the end."""
    config, addr = write_config(tmp_path, text)
    d = await start_daemon(config, addr)
    try:
        yield d
    finally:
        await d.close()


async def load(d: DaemonProc, spawn_dir: Path, replicas: int) -> dict[str, dict[str, int]]:
    """Load `replicas` replicas; their pids by replica id, every role of spawny_backend."""
    reply = await d.stub.Load(pb.LoadRequest(model="spawny", replicas=replicas), timeout=LOAD_S)
    assert len(reply.replicas) == replicas
    out = {}
    for replica in reply.replicas:
        pids = json.loads((spawn_dir / f"{replica.pid}.json").read_text())
        assert sorted(pids) == sorted(ROLES)
        out[replica.id] = pids
    return out


def every_pid(by_replica: dict[str, dict[str, int]]) -> list[int]:
    return sorted(pid for pids in by_replica.values() for pid in pids.values())


async def sentinel_pid(d: DaemonProc) -> int:
    line = await d.wait_log(lambda e: e.get("event") == "containment")
    return int(line["sentinel_pid"])


@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_kill_9_of_modeld_leaves_no_descendant(tmp_path: Path, mechanism: str) -> None:
    spawn_dir = tmp_path / "spawned"
    async with daemon(tmp_path, body(mechanism, spawn_dir)) as d:
        line = await d.wait_log(lambda e: e.get("event") == "containment")
        assert line["mechanism"] == mechanism
        pids = every_pid(await load(d, spawn_dir, 2))
        assert pids_alive(pids) == pids and len(pids) == 2 * len(ROLES)

        d.proc.kill()
        await d.proc.wait()

        assert await wait_pids_gone(pids, GONE_S) == []


@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_a_restarted_modeld_stops_what_is_left_before_serving(
    tmp_path: Path, mechanism: str
) -> None:
    spawn_dir = tmp_path / "spawned"
    decoy = await asyncio.create_subprocess_exec(sys.executable, str(SPAWNY), "sleep")
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    try:
        async with daemon(other_dir, body(mechanism, other_dir / "spawned")) as other:
            theirs = every_pid(await load(other, other_dir / "spawned", 1))
            async with daemon(tmp_path, body(mechanism, spawn_dir)) as first:
                by_replica = await load(first, spawn_dir, 2)
                # Without the sentinel, nothing is there to stop the strays at once.
                os.kill(await sentinel_pid(first), signal.SIGKILL)
                first.proc.kill()
                await first.proc.wait()
            strays = sorted(p["worker"] for p in by_replica.values())
            assert pids_alive(strays) == strays, "the test needs strays to outlive modeld"

            async with daemon(tmp_path, body(mechanism, spawn_dir)) as again:
                # Serving (start_daemon awaited it): nothing of the first life may live.
                assert pids_alive(every_pid(by_replica)) == []
                assert pids_alive(theirs) == theirs
                assert decoy.returncode is None and pids_alive([decoy.pid]) == [decoy.pid]
                listed = await other.stub.ListReplicas(pb.ListReplicasRequest())
                assert [r.state for r in listed.replicas] == [pb.READY]
                assert await again.stop() == 0
            assert await other.stop() == 0
        assert pids_alive(theirs) == []
    finally:
        decoy.kill()
        await decoy.wait()


@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_unload_returns_once_every_descendant_is_gone(tmp_path: Path, mechanism: str) -> None:
    spawn_dir = tmp_path / "spawned"
    async with daemon(tmp_path, body(mechanism, spawn_dir)) as d:
        pids = every_pid(await load(d, spawn_dir, 2))
        await d.stub.Unload(pb.UnloadRequest(model="spawny"), timeout=LOAD_S)
        assert pids_alive(pids) == []
        listed = await d.stub.ListReplicas(pb.ListReplicasRequest())
        assert {r.state for r in listed.replicas} <= {pb.STOPPED}
        assert await d.stop() == 0


async def test_idle_eviction_reports_stopped_once_every_descendant_is_gone(
    tmp_path: Path,
) -> None:
    spawn_dir = tmp_path / "spawned"
    text = body(
        "marker",
        spawn_dir,
        model_extra='idle_ttl = "1s"\n[watchdog]\nwatchdog_interval = "100ms"\n',
    )
    async with daemon(tmp_path, text) as d:
        events = d.stub.WatchEvents(pb.WatchEventsRequest(model="spawny"))
        by_replica = await load(d, spawn_dir, 1)
        (replica_id,) = by_replica
        alive_at_stopped: list[int] | None = None
        async with asyncio.timeout(LOAD_S):
            async for event in events:
                if event.replica_id == replica_id and event.to_state == pb.STOPPED:
                    alive_at_stopped = pids_alive(every_pid(by_replica))
                    assert event.reason == "idle"
                    break
        events.cancel()
        assert alive_at_stopped == []
        assert await d.stop() == 0


@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_shutdown_stops_every_descendant(tmp_path: Path, mechanism: str) -> None:
    spawn_dir = tmp_path / "spawned"
    missing = (
        '[backends.missing]\ncommand = ["/nonexistent/backend", "--addr", "{addr}"]\n'
        '[models.missing]\nbackend = "missing"\n'
    )
    async with daemon(tmp_path, body(mechanism, spawn_dir, model_extra=missing)) as d:
        line = await d.wait_log(lambda e: e.get("event") == "containment")
        pids = every_pid(await load(d, spawn_dir, 2))
        with pytest.raises(grpc.aio.AioRpcError):  # a spawn that fails leaves no cgroup
            await d.stub.Load(pb.LoadRequest(model="missing"), timeout=LOAD_S)
        assert await d.stop() == 0
        assert pids_alive(pids) == []
        # Nothing of this run is left in the cgroup tree either.
        assert "cgroup_dir" not in line or not Path(line["cgroup_dir"]).exists()


async def test_a_second_modeld_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    spawn_dir = tmp_path / "spawned"
    async with daemon(tmp_path, body("marker", spawn_dir)) as first:
        pids = every_pid(await load(first, spawn_dir, 1))
        config, addr = write_config(tmp_path, body("marker", spawn_dir))
        second = await start_daemon(config, addr, wait=False)
        try:
            assert await asyncio.wait_for(second.proc.wait(), LOAD_S) == 2
        finally:
            await second.close()
        assert any("another modeld (pid" in line for line in second.raw), second.raw[-5:]
        # Its clean-up at start would have killed these: it never ran.
        assert pids_alive(pids) == pids
        assert await first.stop() == 0


async def test_a_crash_of_the_backend_takes_every_descendant_with_it(tmp_path: Path) -> None:
    spawn_dir = tmp_path / "spawned"
    async with daemon(tmp_path, body("auto", spawn_dir)) as d:
        events = d.stub.WatchEvents(pb.WatchEventsRequest(model="spawny"))
        by_replica = await load(d, spawn_dir, 1)
        ((replica_id, pids),) = by_replica.items()
        os.kill(pids["backend"], signal.SIGKILL)
        async with asyncio.timeout(LOAD_S):
            async for event in events:
                if event.replica_id == replica_id and event.to_state == pb.FAILED:
                    break
        events.cancel()
        # The setsid() worker ignoring SIGTERM included: nothing outlives the crash.
        assert await wait_pids_gone(every_pid(by_replica), GONE_S) == []
        assert await d.stop() == 0
