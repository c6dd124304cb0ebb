"""One replica: the single owner of one backend process and of its state.

STARTING → WAITING_READY → LOADING → READY → DRAINING → STOPPING → STOPPED, or
FAILED. Only `_transition` assigns the state; it checks the edge, stamps the
time, logs once, writes the row and publishes the event.

Three tasks may act on a replica, and each owns a slice of its life:
- the start task (`ensure_ready`) owns the starting states, port retries included,
  and reports a failed start;
- the exit watch of each process notices its exit at once; it reports a crash
  only of a READY or DRAINING replica (during a start the start task reports it,
  during STOPPING the exit was asked for);
- the stop task (`stop`) waits for the start task to give up (every wait of a
  start races the stop request), then drains, stops and reaps.
"""

import asyncio
import contextlib
import os
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import structlog

from modeld.clock import Clock
from modeld.errors import InvalidArgument, Unavailable
from modeld.events import Event, EventBus
from modeld.logstore import STDERR, STDOUT, LogStore, LogSubscription
from modeld.registry import Registry, ReplicaRow
from modeld.spec import BackendSpec, ModelSpec
from modeld.state import ALLOWED, TERMINAL, ReplicaState
from modeld.supervisor.backend_client import GrpcBackend, HttpBackend, grpc_health_once
from modeld.supervisor.launch import LaunchPlan, plan_launch
from modeld.supervisor.process import (
    Spawner,
    free_port,
    kill_group,
    proc_start_time,
    wait_group_gone,
)

T = TypeVar("T")
S = ReplicaState
log = structlog.get_logger(__name__)

PROBE_FIRST_S = 0.005
PROBE_BACKOFF = 1.5
PROBE_CAP_S = 0.25
PROBE_LIMIT_S = 0.5
# New output often means "now listening": probe then, but not more often than this.
PROBE_OUTPUT_GAP_S = 0.02
FREE_LIMIT_S = 2.0
PIPE_DRAIN_S = 0.5
KILL_WAIT_S = 5.0
STDERR_TAIL = 20
EXIT_ADDR_IN_USE = 98


@dataclass(frozen=True)
class ReplicaDeps:
    clock: Clock
    spawner: Spawner
    registry: Registry
    logs: LogStore
    events: EventBus
    models_dir: Path
    python: str = sys.executable
    host: str = "127.0.0.1"
    node_id: str = "local"
    # Picks the port of each start attempt; tests inject one to force a clash.
    ports: Callable[[str], int] = free_port


@dataclass(eq=False)
class _Child:
    """One process of a replica (a start may spawn more than one: port retries)."""

    proc: asyncio.subprocess.Process
    host: str
    port: int
    spawned_at: float  # monotonic
    proc_start: int | None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    exit_code: int | None = None
    pumps: list["asyncio.Task[None]"] = field(default_factory=list)
    watch: "asyncio.Task[None] | None" = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def pgid(self) -> int:
        # The spawner starts every backend in a session of its own, which it leads.
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class _StartFailed(Exception):
    def __init__(self, phase: str, detail: str, exit_code: int | None = None) -> None:
        super().__init__(f"{phase}: {detail}")
        self.phase = phase
        self.detail = detail
        self.exit_code = exit_code


class _StopRequested(Exception):
    pass


def describe_exit(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = str(-code)
    return f"killed by signal {name}"


_PHASE = {S.STARTING: "spawn", S.WAITING_READY: "ready", S.LOADING: "load"}


class Replica:
    """Owns one backend process. Every method runs on the event loop thread."""

    def __init__(
        self,
        replica_id: str,
        spec: ModelSpec,
        backend: BackendSpec,
        deps: ReplicaDeps,
        *,
        gpu_ids: tuple[int, ...] = (),
    ) -> None:
        self._id = replica_id
        self._spec = spec
        self._backend = backend
        self._deps = deps
        self._gpu_ids = gpu_ids
        self._log = log.bind(replica_id=replica_id, model=spec.name)
        self._state = S.STARTING
        self._child: _Child | None = None
        self._client: GrpcBackend | None = None
        self._row_written = False
        self._start_mono = 0.0
        self._started_at: float | None = None
        self._ready_at: float | None = None
        self._stopped_at: float | None = None
        self._last_error = ""
        self._in_flight = 0
        self._last_used = deps.clock.monotonic()
        self._idle_since: float | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._stop_requested = asyncio.Event()
        self._forced = asyncio.Event()
        self._terminal = asyncio.Event()
        self._start_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None

    # read-only view

    @property
    def id(self) -> str:
        return self._id

    @property
    def model(self) -> str:
        return self._spec.name

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def state(self) -> ReplicaState:
        return self._state

    @property
    def address(self) -> str:
        return self._child.address if self._child else ""

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    @property
    def gpu(self) -> str:
        return ",".join(str(i) for i in self._gpu_ids)

    @property
    def started_at(self) -> float | None:
        return self._started_at

    @property
    def ready_at(self) -> float | None:
        return self._ready_at

    @property
    def stopped_at(self) -> float | None:
        return self._stopped_at

    @property
    def last_error(self) -> str:
        return self._last_error

    @property
    def exit_code(self) -> int | None:
        return self._child.exit_code if self._child else None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def last_used(self) -> float:
        return self._last_used

    @property
    def idle_since(self) -> float | None:
        return self._idle_since

    # public operations

    async def ensure_ready(self) -> None:
        """Start the replica (once, whoever asks first) and return when it is READY.

        Raises Unavailable when the start fails or the replica is stopped, and
        InvalidArgument when its spec cannot be started at all. Cancelling one
        caller leaves the start running for the others.
        """
        if self._start_task is None:
            if self._stop_requested.is_set() or self._state in TERMINAL:
                raise Unavailable(f"{self._name()} is {self._state.value}; it will not start")
            self._start_task = asyncio.create_task(self._start(), name=f"start-{self._id}")
            self._start_task.add_done_callback(_retrieve)
        await asyncio.shield(self._start_task)
        if self._state is not S.READY:
            raise Unavailable(f"{self._name()} is {self._state.value}: {self._last_error}")

    async def stop(self, reason: str, *, force: bool = False, drain_timeout: float = 30.0) -> None:
        """Drain (unless forced), stop and reap; idempotent, and safe in any state."""
        if force:
            self._forced.set()
        if self._stop_task is None:
            self._stop_requested.set()
            self._stop_task = asyncio.create_task(
                self._stop(reason, drain_timeout), name=f"stop-{self._id}"
            )
            self._stop_task.add_done_callback(_retrieve)
        await asyncio.shield(self._stop_task)

    def acquire(self) -> bool:
        """Take one in-flight slot; only a READY replica gives one."""
        if self._state is not S.READY:
            return False
        self._in_flight += 1
        self._idle.clear()
        self._idle_since = None
        self._last_used = self._deps.clock.monotonic()
        return True

    def release(self) -> None:
        if self._in_flight == 0:
            return
        self._in_flight -= 1
        self._last_used = self._deps.clock.monotonic()
        if self._in_flight == 0:
            self._idle_since = self._last_used
            self._idle.set()

    async def wait_terminal(self) -> ReplicaState:
        await self._terminal.wait()
        return self._state

    # the one place the state changes

    async def _transition(
        self, new: ReplicaState, reason: str, *, last_error: str | None = None
    ) -> None:
        old = self._state
        if new not in ALLOWED[old]:
            raise RuntimeError(f"{self._name()}: {old.value} -> {new.value} is not allowed")
        self._state = new
        wall = self._deps.clock.wall()
        changes: dict[str, object] = {"state": new.value}
        if new is S.READY:
            self._ready_at = changes["ready_at"] = wall
            self._last_used = self._deps.clock.monotonic()
            self._idle_since = self._last_used
        elif new in TERMINAL:
            self._stopped_at = changes["stopped_at"] = wall
        if last_error is not None:
            self._last_error = changes["last_error"] = last_error
        level = "warning" if new is S.FAILED else "info"
        self._log.log(
            _LEVELS[level], "replica_state", from_state=old.value, to_state=new.value, reason=reason
        )
        await self._persist(changes)
        await self._publish(old, new, reason, wall)
        if new in TERMINAL:
            self._deps.logs.close(self._id)
            self._terminal.set()

    async def _persist(self, changes: dict[str, object]) -> None:
        # The in-memory state has changed (a process really exited); a registry that
        # cannot write must not also hide that from the rest of the daemon.
        try:
            if self._row_written:
                await self._deps.registry.update_replica(self._id, **changes)
            else:
                await self._deps.registry.insert_replica(self._row())
                self._row_written = True
        except Unavailable as exc:
            self._log.error("replica_row_not_written", error=str(exc))

    async def _publish(
        self, old: ReplicaState | None, new: ReplicaState, reason: str, wall: float
    ) -> None:
        event = Event(wall, self._id, self._spec.name, old, new, reason)
        self._deps.events.publish(event)
        try:
            await self._deps.registry.add_event(event)
        except Unavailable as exc:
            self._log.error("replica_event_not_written", error=str(exc))

    def _row(self) -> ReplicaRow:
        child = self._child
        return ReplicaRow(
            id=self._id,
            model=self._spec.name,
            backend=self._backend.name,
            state=self._state.value,
            address=child.address if child else "",
            pid=child.pid if child else None,
            pgid=child.pgid if child else None,
            proc_start=child.proc_start if child else None,
            gpu=self.gpu,
            started_at=self._started_at,
            ready_at=self._ready_at,
            stopped_at=self._stopped_at,
            last_error=self._last_error,
            node_id=self._deps.node_id,
        )
