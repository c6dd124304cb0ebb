"""The replica lifecycle with real backend processes, a real registry file, on uvloop."""

import asyncio
import contextlib
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
import uvloop

from modeld.clock import SystemClock
from modeld.errors import InvalidArgument, Unavailable
from modeld.ops.events import Event, EventBus, Subscription
from modeld.ops.logstore import STDERR, STDOUT, LogStore
from modeld.spec import BackendSpec, ModelSpec
from modeld.state import ReplicaState
from modeld.storage.registry import Registry
from modeld.supervisor.process import (
    BackendProcess,
    ProcessSpawner,
    free_port,
    pid_alive,
    process_matches,
)
from modeld.supervisor.replica import Replica, ReplicaDeps
from modeld.supervisor.slots import SlotError

S = ReplicaState
ECHO = ("{python}", "-m", "modeld.backends.echo", "--addr", "{addr}")
LISTENING = "echo_backend listening"

pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy"')


@pytest.fixture
def event_loop_policy() -> asyncio.AbstractEventLoopPolicy:
    policy: asyncio.AbstractEventLoopPolicy = uvloop.EventLoopPolicy()
    return policy


class CountingSpawner:
    """The real spawner, counting its calls."""

    def __init__(self) -> None:
        self.calls: list[Sequence[str]] = []
        self._real = ProcessSpawner()

    async def spawn(
        self, argv: Sequence[str], *, env: Any, cwd: str | None, cgroup: Path | None = None
    ) -> BackendProcess:
        self.calls.append(argv)
        return await self._real.spawn(argv, env=env, cwd=cwd, cgroup=cgroup)


@dataclass
class Harness:
    registry: Registry
    models_dir: Path
    bus: EventBus = field(default_factory=EventBus)
    logs: LogStore = field(default_factory=lambda: LogStore(SystemClock()))
    spawner: CountingSpawner = field(default_factory=CountingSpawner)
    replicas: list[Replica] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)

    def replica(
        self,
        *flags: str,
        model_file: str = "m.bin",
        command: tuple[str, ...] = ECHO,
        gpu_ids: tuple[int, ...] = (),
        **kw: Any,
    ) -> Replica:
        kw.setdefault("ready_timeout", 10.0)
        kw.setdefault("stop_grace", 2.0)
        backend = BackendSpec(name="echo", command=(*command, *flags), **kw)
        spec = ModelSpec(name="m", backend="echo", model_file=model_file)
        deps = ReplicaDeps(
            clock=SystemClock(),
            spawner=self.spawner,
            registry=self.registry,
            logs=self.logs,
            events=self.bus,
            models_dir=self.models_dir,
            ports=self._port,
        )
        replica = Replica(f"r{len(self.replicas) + 1}", spec, backend, deps, gpu_ids=gpu_ids)
        self.replicas.append(replica)
        return replica

    def _port(self, host: str) -> int:
        return self.ports.pop(0) if self.ports else free_port(host)

    def lines(self, replica: Replica, stream: str) -> list[str]:
        return [ln.text for ln in self.logs.tail_lines(replica.id, 1000) if ln.stream == stream]


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    models = tmp_path / "models"
    models.mkdir()
    (models / "m.bin").write_bytes(b"weights")
    registry = await Registry.open(tmp_path / "modeld.db")
    h = Harness(registry, models)
    try:
        yield h
    finally:
        await asyncio.gather(*(r.stop("test over", force=True) for r in h.replicas))
        await registry.close()


async def next_event(sub: Subscription, to_state: ReplicaState, limit_s: float) -> Event:
    async with asyncio.timeout(limit_s):
        async for event in sub:
            if event.to_state is to_state:
                return event
    raise AssertionError(f"the event stream ended before a {to_state.value} event")


def queued(sub: Subscription) -> list[Event]:
    """The events already published to `sub`, taken without waiting."""
    return sub.pending()


def grandchild_pid(h: Harness, replica: Replica) -> int:
    for line in h.lines(replica, STDOUT):
        if match := re.fullmatch(r"grandchild pid=(\d+)", line):
            return int(match[1])
    raise AssertionError(f"no grandchild line in {h.lines(replica, STDOUT)}")


async def test_runs_on_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


async def test_echo_reaches_ready_and_is_recorded_first(harness: Harness) -> None:
    sub = harness.bus.subscribe()
    replica = harness.replica()
    await replica.ensure_ready()

    assert replica.state is S.READY
    assert replica.pid is not None and pid_alive(replica.pid)
    row = await harness.registry.get_replica(replica.id)
    assert row is not None and row.state == "READY"
    assert row.pid == replica.pid == row.pgid
    assert row.proc_start is not None and process_matches(row.pid, row.proc_start)
    assert row.address == replica.address and row.ready_at is not None
    seen = queued(sub)
    assert [(e.from_state, e.to_state) for e in seen] == [
        (None, S.STARTING),
        (S.STARTING, S.WAITING_READY),
        (S.WAITING_READY, S.LOADING),
        (S.LOADING, S.READY),
    ]
    listening = [
        ln for ln in harness.logs.tail_lines(replica.id, 100) if ln.text.startswith(LISTENING)
    ]
    assert replica.ready_at is not None and len(listening) == 1
    overhead_ms = (replica.ready_at - listening[0].time) * 1000
    print(f"\nreadiness overhead after the backend's listening line: {overhead_ms:.1f} ms")


async def test_exit_during_start_fails_at_once_with_stderr(harness: Harness) -> None:
    replica = harness.replica("--exit-on-start", "7", ready_timeout=30.0)
    began = time.monotonic()
    with pytest.raises(Unavailable) as failure:
        await replica.ensure_ready()
    elapsed = time.monotonic() - began

    # Far below ready_timeout (30 s): the exit ended the wait, not the deadline.
    assert elapsed < 15.0, f"took {elapsed:.1f}s; ready_timeout was 30s"
    message = str(failure.value)
    assert "exiting on purpose" in message
    assert "phase ready" in message and "exited with code 7" in message
    assert replica.state is S.FAILED and replica.exit_code == 7
    row = await harness.registry.get_replica(replica.id)
    assert row is not None and row.state == "FAILED" and "exiting on purpose" in row.last_error


async def test_stop_kills_a_sigterm_ignoring_backend_and_its_grandchild(harness: Harness) -> None:
    replica = harness.replica("--ignore-sigterm", "--spawn-grandchild", stop_grace=0.5)
    await replica.ensure_ready()
    pid = replica.pid
    assert pid is not None
    grandchild = grandchild_pid(harness, replica)
    assert pid_alive(grandchild)

    await replica.stop("test", drain_timeout=0)

    assert replica.state is S.STOPPED
    assert not pid_alive(pid)
    assert not pid_alive(grandchild)
    row = await harness.registry.get_replica(replica.id)
    assert row is not None and row.state == "STOPPED" and row.stopped_at is not None


async def test_crash_is_failed_and_published_by_the_exit_watch(harness: Harness) -> None:
    """Nothing but the exit watch runs here (no probe, no caller): it alone reports the
    crash. Its latency is printed; a loaded machine must not fail the test."""
    replica = harness.replica("--spawn-grandchild")
    await replica.ensure_ready()
    grandchild = grandchild_pid(harness, replica)
    sub = harness.bus.subscribe()
    assert replica.pid is not None

    os.kill(replica.pid, signal.SIGKILL)
    began = time.monotonic()
    event = await next_event(sub, S.FAILED, limit_s=10)
    print(f"\ncrash seen as FAILED after {(time.monotonic() - began) * 1000:.1f} ms")

    assert event.from_state is S.READY and event.reason == "killed by signal SIGKILL"
    assert replica.state is S.FAILED
    assert not replica.acquire("lease-1")
    await replica.wait_terminal()
    assert not pid_alive(grandchild)
    row = await harness.registry.get_replica(replica.id)
    assert row is not None and row.state == "FAILED" and "SIGKILL" in row.last_error


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "escape/passwd"])
async def test_model_file_outside_models_dir_spawns_nothing(harness: Harness, bad: str) -> None:
    (harness.models_dir / "escape").symlink_to("/etc")
    replica = harness.replica(model_file=bad)

    with pytest.raises(InvalidArgument):
        await replica.ensure_ready()

    assert harness.spawner.calls == []
    assert replica.state is S.FAILED and replica.pid is None


async def test_retries_on_another_port_when_the_first_is_taken(harness: Harness) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        harness.ports.append(busy)
        replica = harness.replica()
        await replica.ensure_ready()

    assert replica.state is S.READY
    assert len(harness.spawner.calls) == 2
    assert replica.restarts == 1
    row = await harness.registry.get_replica(replica.id)
    assert row is not None and row.restarts == 1 and row.pid == replica.pid
    assert not replica.address.endswith(f":{busy}")
    assert any(
        f"address already in use: 127.0.0.1:{busy}" in ln for ln in harness.lines(replica, STDERR)
    )


async def test_progress_extends_the_ready_deadline(harness: Harness) -> None:
    # ready_timeout leaves room for the interpreter to start on a loaded machine (no
    # output until then); the backend then prints progress for longer than that.
    replica = harness.replica("--start-delay", "3", ready_timeout=2.0)
    await replica.ensure_ready()
    assert replica.state is S.READY
    assert replica.started_at is not None and replica.ready_at is not None
    assert replica.ready_at - replica.started_at > 2.0


async def test_silent_backend_fails_after_ready_timeout(harness: Harness) -> None:
    silent = ("{python}", "-c", "import time; time.sleep(30)")
    replica = harness.replica(command=silent, ready_timeout=0.5)
    began = time.monotonic()
    with pytest.raises(Unavailable, match=r"phase ready.*no progress for ready_timeout 0\.5s"):
        await replica.ensure_ready()
    elapsed = time.monotonic() - began

    # Given up after ready_timeout, and long before the process itself would end (30 s).
    assert 0.5 <= elapsed < 15.0
    assert replica.pid is not None and not pid_alive(replica.pid)


async def test_failed_load_is_reported_and_cleaned_up(harness: Harness) -> None:
    replica = harness.replica("--fail-load")
    with pytest.raises(Unavailable) as failure:
        await replica.ensure_ready()
    assert "phase load" in str(failure.value)
    assert "load failed on purpose" in str(failure.value)
    assert replica.pid is not None and not pid_alive(replica.pid)
    assert replica.state is S.FAILED


async def test_concurrent_callers_share_one_start_and_survive_a_cancel(harness: Harness) -> None:
    replica = harness.replica("--start-delay", "0.3")
    impatient = asyncio.create_task(replica.ensure_ready())
    patient = asyncio.create_task(replica.ensure_ready())
    await asyncio.sleep(0)
    impatient.cancel()

    await patient
    assert impatient.cancelled()
    assert replica.state is S.READY
    assert len(harness.spawner.calls) == 1


async def test_stop_during_start_stops_the_process(harness: Harness) -> None:
    replica = harness.replica("--start-delay", "30", ready_timeout=30.0)
    sub = harness.bus.subscribe()
    starting = asyncio.create_task(replica.ensure_ready())
    await next_event(sub, S.WAITING_READY, limit_s=5.0)
    pid = replica.pid
    assert pid is not None

    await replica.stop("unload", drain_timeout=0)

    with pytest.raises(Unavailable, match="stopped while starting"):
        await starting
    assert replica.state is S.STOPPED
    assert not pid_alive(pid)
    with pytest.raises(Unavailable):
        await replica.ensure_ready()


async def test_drain_waits_for_leases_then_stops(harness: Harness) -> None:
    replica = harness.replica()
    await replica.ensure_ready()
    assert replica.acquire("lease-1")
    sub = harness.bus.subscribe()
    stopping = asyncio.create_task(replica.stop("idle", drain_timeout=10.0))
    await next_event(sub, S.DRAINING, limit_s=2.0)

    assert not replica.acquire("lease-1")
    assert not stopping.done()
    replica.release("lease-1")
    await stopping
    assert replica.state is S.STOPPED
    assert replica.in_flight == 0
    with pytest.raises(SlotError, match="given back but not held"):
        replica.release("lease-1")
    assert replica.in_flight == 0


async def test_stop_is_idempotent_and_concurrent_calls_share_it(harness: Harness) -> None:
    replica = harness.replica()
    await replica.ensure_ready()
    await asyncio.gather(replica.stop("a"), replica.stop("b", force=True))
    await replica.stop("again")
    assert await replica.wait_terminal() is S.STOPPED


async def test_http_backend_is_ready_when_its_health_url_answers(
    harness: Harness, tmp_path: Path
) -> None:
    (tmp_path / "health").write_text("ok")
    server = ("{python}", "-m", "http.server", "{port}", "--bind", "{host}")
    replica = harness.replica(
        command=server, protocol="http", health_path="/health", workdir=str(tmp_path)
    )
    sub = harness.bus.subscribe()
    await replica.ensure_ready()
    await replica.stop("test")

    states = [e.to_state for e in queued(sub)]
    assert states == [S.STARTING, S.WAITING_READY, S.READY, S.DRAINING, S.STOPPING, S.STOPPED]


async def test_spawn_failure_names_the_phase(harness: Harness) -> None:
    replica = harness.replica(command=("/nonexistent/backend", "{addr}"))
    with pytest.raises(Unavailable, match="phase spawn"):
        await replica.ensure_ready()
    assert replica.state is S.FAILED


async def test_gpu_ids_reach_the_backend_environment(harness: Harness) -> None:
    show = (
        "{python}",
        "-c",
        "import os,sys; print(os.environ['CUDA_VISIBLE_DEVICES']); "
        "sys.stdout.flush(); import time; time.sleep(30)",
    )
    replica = harness.replica(command=show, ready_timeout=0.3, gpu_ids=(0, 2))
    with contextlib.suppress(Unavailable):
        await replica.ensure_ready()
    assert harness.lines(replica, STDOUT)[:1] == ["0,2"]
    assert replica.gpu == "0,2"


async def test_stop_before_the_start_runs_spawns_nothing(harness: Harness) -> None:
    replica = harness.replica()
    starting = asyncio.create_task(replica.ensure_ready())
    await asyncio.sleep(0)  # the start task exists but has not run yet
    await replica.stop("changed my mind")

    with pytest.raises(Unavailable, match="stopped while starting"):
        await starting
    assert harness.spawner.calls == []
    assert replica.state is S.STOPPED


async def test_probe_and_kill(harness: Harness) -> None:
    replica = harness.replica()
    assert not await replica.probe(1.0)
    await replica.ensure_ready()
    assert await replica.probe(1.0)

    replica.kill()

    assert await replica.wait_terminal() is S.FAILED
    assert "SIGKILL" in replica.last_error
    assert not await replica.probe(1.0)


async def test_stop_returns_when_cleaning_up_after_a_crash_fails(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 9: a crash whose clean-up raised left `_terminal` unset, so stop() hung."""
    replica = harness.replica()
    await replica.ensure_ready()
    real_finish = replica._finish_child
    failed = asyncio.Event()

    async def failing_finish(child: Any) -> list[int]:
        failed.set()
        monkeypatch.setattr(replica, "_finish_child", real_finish)
        raise OSError("injected: the process table could not be read")

    monkeypatch.setattr(replica, "_finish_child", failing_finish)
    assert replica.pid is not None
    os.kill(replica.pid, signal.SIGKILL)
    await asyncio.wait_for(failed.wait(), 10)

    await asyncio.wait_for(replica.stop("test", drain_timeout=0), 10)
    assert await asyncio.wait_for(replica.wait_terminal(), 1) is S.FAILED


async def test_a_crash_after_a_route_is_logged_under_the_replica_not_the_route(
    harness: Harness,
) -> None:
    """Defect 10: the exit watch was started inside the Route that caused the start, so a
    crash logged long after it carried that Route's request id."""
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logged:
        replica = harness.replica()

        async def route() -> None:
            structlog.contextvars.bind_contextvars(request_id="route-1", method="Route")
            await replica.ensure_ready()

        await asyncio.create_task(route())
        sub = harness.bus.subscribe()
        assert replica.pid is not None
        os.kill(replica.pid, signal.SIGKILL)
        await next_event(sub, S.FAILED, limit_s=10)

    [crash] = [e for e in logged if e.get("to_state") == "FAILED"]
    assert crash["replica_id"] == replica.id
    assert "request_id" not in crash and "method" not in crash, crash


async def test_a_spawn_the_registry_cannot_record_is_killed_and_fails_the_start(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start sequence (starting.py) hears of the child only once the replica
    holds it; a child whose row cannot be written must still be killed and reaped."""
    real_insert = harness.registry.insert_replica
    refused: list[int | None] = []

    async def refusing_insert(row: Any) -> None:
        if not refused:
            refused.append(row.pid)
            raise Unavailable("injected: the registry cannot write")
        await real_insert(row)

    monkeypatch.setattr(harness.registry, "insert_replica", refusing_insert)
    replica = harness.replica()
    with pytest.raises(Unavailable, match="Unavailable: injected"):
        await replica.ensure_ready()

    assert replica.state is S.FAILED and refused == [replica.pid]
    assert replica.pid is not None and not pid_alive(replica.pid)
    assert "(phase spawn)" in replica.last_error
