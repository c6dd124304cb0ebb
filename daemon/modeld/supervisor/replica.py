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
import contextvars
import os
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog

from modeld.clock import Clock
from modeld.errors import InvalidArgument, Unavailable
from modeld.ops.events import Event, EventBus
from modeld.ops.logstore import STDERR, STDOUT, LogStore
from modeld.routing.slots import Slots
from modeld.spec import BackendSpec, ModelSpec
from modeld.state import ALLOWED, TERMINAL, ReplicaState
from modeld.storage.registry import Registry, ReplicaRow
from modeld.supervisor.backend_client import (
    BackendCallError,
    GrpcBackend,
    HttpBackend,
    grpc_health_once,
)
from modeld.supervisor.child import (
    KILL_WAIT_S,
    PIPE_DRAIN_S,
    Child,
    describe_exit,
    discard,
    wait_tasks,
)
from modeld.supervisor.containment import Containment
from modeld.supervisor.launch import LaunchPlan, plan_launch
from modeld.supervisor.process import Spawner, free_port, proc_start_time
from modeld.supervisor.readiness import StartFailed, StartRace, StopRequested, exit_failure

S = ReplicaState
T = TypeVar("T")
log = structlog.get_logger(__name__)

FREE_LIMIT_S = 2.0
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
    # How every descendant of a backend is found and stopped (the daemon probes for it).
    containment: Containment = field(default_factory=Containment.marker_only)
    # (replica id, GPU ids, every pid it had): its processes are gone, its GPU memory
    # may not be yet (capacity/releasing.py).
    on_released: Callable[[str, tuple[int, ...], list[int]], None] | None = None


_PHASE = {S.STARTING: "spawn", S.WAITING_READY: "ready", S.LOADING: "load"}
# The replica's owner hears every state change at once, by direct call (not the bus).
StateListener = Callable[["Replica", ReplicaState, ReplicaState, str], None]


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
        listener: StateListener | None = None,
    ) -> None:
        self._id = replica_id
        self._listener = listener
        self._spec = spec
        self._backend = backend
        self._deps = deps
        self._gpu_ids = gpu_ids
        self._log = log.bind(replica_id=replica_id, model=spec.name)
        self._box = deps.containment.box(replica_id)
        self._state = S.STARTING
        self._child: Child | None = None
        self._client: GrpcBackend | None = None
        self._row_written = False
        self._restarts = 0
        self._started_at: float | None = None
        self._ready_at: float | None = None
        self._stopped_at: float | None = None
        self._last_error = ""
        self._slots = Slots(deps.clock.monotonic())
        self._stop_requested = asyncio.Event()
        self._unresponsive = False
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
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def backend_name(self) -> str:
        return self._backend.name

    @property
    def protocol(self) -> str:
        return self._backend.protocol

    @property
    def node_id(self) -> str:
        return self._deps.node_id

    @property
    def gpu_ids(self) -> tuple[int, ...]:
        return self._gpu_ids

    @property
    def restarts(self) -> int:
        """Processes this replica spawned again (a start retried on a fresh port)."""
        return self._restarts

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
    def stop_requested(self) -> bool:
        return self._stop_requested.is_set()

    @property
    def in_flight(self) -> int:
        return self._slots.count

    @property
    def last_used(self) -> float:
        return self._slots.last_used

    @property
    def idle_since(self) -> float | None:
        return self._slots.idle_since

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
            self._start_task = self._background(self._start(), f"start-{self._id}")
            self._start_task.add_done_callback(_retrieve)
        await asyncio.shield(self._start_task)
        if self._state is not S.READY:
            raise Unavailable(f"{self._name()} is {self._state.value}: {self._last_error}")

    async def stop(
        self,
        reason: str,
        *,
        force: bool = False,
        drain_timeout: float = 30.0,
        responsive: bool = True,
    ) -> None:
        """Drain (unless forced), stop and reap; idempotent, and safe in any state.

        `responsive=False` (the backend stopped answering) skips the Free call, which
        would only wait out its deadline.
        """
        if force:
            self._forced.set()
        if not responsive:
            self._unresponsive = True
        if self._stop_task is None:
            self._stop_requested.set()
            self._stop_task = self._background(
                self._stop(reason, drain_timeout), f"stop-{self._id}"
            )
            self._stop_task.add_done_callback(_retrieve)
        await asyncio.shield(self._stop_task)

    def acquire(self, holder: str) -> bool:
        """Take one in-flight slot for `holder` (a lease id); only a READY replica that is
        not being stopped gives one."""
        if self._state is not S.READY or self._stop_requested.is_set():
            return False
        self._slots.take(holder, self._deps.clock.monotonic())
        return True

    def release(self, holder: str) -> None:
        """Give back `holder`'s slot; giving one back twice raises (a bookkeeping bug)."""
        self._slots.give_back(holder, self._deps.clock.monotonic())

    async def probe(self, limit_s: float) -> bool:
        """One health call to the backend, for the router's cached probes."""
        child = self._child
        if child is None or child.exited.is_set():
            return False
        if self._client is not None:
            return await self._client.health(limit_s)
        return await self._health_probe(child)(limit_s)

    def kill(self) -> None:
        """SIGKILL the process group now (daemon shutdown without grace); the exit
        watch and any stop in progress see the exit as usual."""
        if self._child is not None:
            self._child.signal_group(signal.SIGKILL)

    async def wait_terminal(self) -> ReplicaState:
        """STOPPED or FAILED, once reached and every process of the replica is gone."""
        await self._terminal.wait()
        return self._state

    def _background(self, work: Coroutine[Any, Any, T], name: str) -> "asyncio.Task[T]":
        """A task of this replica's own: it outlives the RPC that happened to cause it
        (and is shared by every later caller), so it runs in a fresh context bound to
        the replica instead of inheriting that RPC's request id."""
        context = contextvars.Context()
        context.run(structlog.contextvars.bind_contextvars, replica_id=self._id, model=self.model)
        return context.run(asyncio.create_task, work, name=name)

    # the one place the state changes

    async def _transition(
        self,
        new: ReplicaState,
        reason: str,
        *,
        last_error: str | None = None,
        settled: bool = True,
    ) -> None:
        """The only assignment of the state. `settled=False`: a terminal state whose
        processes are still being reaped; the caller sets `_terminal` when they are."""
        old = self._state
        if new not in ALLOWED[old]:
            raise RuntimeError(f"{self._name()}: {old.value} -> {new.value} is not allowed")
        self._state = new
        wall = self._deps.clock.wall()
        changes: dict[str, object] = {"state": new.value}
        if new is S.READY:
            self._ready_at = changes["ready_at"] = wall
            self._slots.mark_ready(self._deps.clock.monotonic())
        elif new in TERMINAL:
            self._stopped_at = changes["stopped_at"] = wall
        if last_error is not None:
            self._last_error = changes["last_error"] = last_error
        emit = self._log.warning if new is S.FAILED else self._log.info
        emit("replica_state", from_state=old.value, to_state=new.value, reason=reason)
        if self._listener is not None:
            self._listener(self, old, new, reason)
        await self._persist(changes)
        await self._publish(old, new, reason, wall)
        if new in TERMINAL:
            self._deps.logs.close(self._id)
            if settled:
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
            restarts=self._restarts,
            node_id=self._deps.node_id,
        )

    # start

    async def _start(self) -> None:
        race = StartRace(
            clock=self._deps.clock,
            logs=self._deps.logs,
            replica_id=self._id,
            backend=self._backend,
            stop_requested=self._stop_requested,
        )
        try:
            plan = plan_launch(
                self._spec,
                self._backend,
                self._deps.models_dir,
                python=self._deps.python,
                base_env=os.environ,
                gpu_ids=self._gpu_ids,
                owner=self._box.owner,
            )
        except InvalidArgument as exc:
            await self._transition(S.FAILED, "cannot be started as specified", last_error=str(exc))
            raise
        try:
            await self._bring_up(plan, race)
        except StopRequested:
            raise Unavailable(f"{self._name()} was stopped while starting") from None
        except StartFailed as failure:
            raise await self._fail_start(failure) from None
        except Exception as exc:
            # A registry failure or a bug must not leave a half-started process behind.
            internal = StartFailed(_PHASE.get(self._state, "spawn"), f"{type(exc).__name__}: {exc}")
            raise await self._fail_start(internal) from exc

    async def _bring_up(self, plan: LaunchPlan, race: StartRace) -> None:
        child = await self._spawn_until_healthy(plan, race)
        if self._backend.protocol == "grpc":
            await self._transition(S.LOADING, "healthy; loading the model")
            await self._load(child, plan, race)
        if child.exited.is_set():
            raise exit_failure(child, _PHASE[self._state])
        elapsed = race.elapsed()
        await self._transition(S.READY, f"ready at {child.address} after {elapsed:.3f}s")
        self._deps.logs.note(self._id, f"ready at {child.address} after {elapsed:.3f}s")

    async def _spawn_until_healthy(self, plan: LaunchPlan, race: StartRace) -> Child:
        """Spawn and wait for health, on a fresh port while the last one was taken."""
        attempt = 1
        while True:
            child = await self._spawn(plan)
            if self._state is S.STARTING:
                await self._transition(S.WAITING_READY, f"spawned pid {child.pid}")
            try:
                await race.wait_healthy(child, self._health_probe(child))
            except StartFailed as failure:
                if attempt >= self._backend.start_attempts or not self._lost_port(child, failure):
                    raise
                self._log.warning("replica_port_taken", port=child.port, attempt=attempt)
                self._deps.logs.note(self._id, f"port {child.port} was taken; trying another")
                await self._finish_child(child)
                attempt += 1
                self._restarts += 1
            else:
                return child

    async def _spawn(self, plan: LaunchPlan) -> Child:
        if self._stop_requested.is_set():
            raise StopRequested
        host = self._deps.host
        port = self._deps.ports(host)
        argv = plan.argv(host, port)
        self._deps.logs.open(self._id, self._spec.name)
        try:
            self._box.prepare()
            proc = await self._deps.spawner.spawn(
                argv, env=plan.env, cwd=plan.cwd, cgroup=self._box.cgroup
            )
        except OSError as exc:
            self._box.close()
            raise StartFailed("spawn", f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None
        child = Child(
            proc,
            host,
            port,
            self._deps.clock.monotonic(),
            self._deps.clock.wall(),
            proc_start_time(proc.pid),
            self._box,
            on_gone=self._released,
        )
        max_line = self._backend.max_output_line
        child.pumps = [
            self._background(
                self._deps.logs.pump(self._id, name, pipe, max_line=max_line),
                f"{name}-{self._id}",
            )
            for name, pipe in ((STDOUT, proc.stdout), (STDERR, proc.stderr))
        ]
        child.watch = self._background(self._watch_exit(child), f"exit-{self._id}")
        self._child = child
        self._deps.logs.note(self._id, f"spawned pid {proc.pid}: {shlex.join(argv)}")
        await self._record_spawn(child)
        return child

    async def _record_spawn(self, child: Child) -> None:
        """Make the process durable before anyone hears of the replica."""
        if self._started_at is None:
            self._started_at = child.spawned_wall
        if self._row_written:
            await self._deps.registry.update_replica(
                self._id,
                address=child.address,
                pid=child.pid,
                pgid=child.pgid,
                proc_start=child.proc_start,
                restarts=self._restarts,
            )
            return
        await self._deps.registry.insert_replica(self._row())
        self._row_written = True
        await self._publish(None, S.STARTING, f"spawned pid {child.pid}", child.spawned_wall)

    def _lost_port(self, child: Child, failure: StartFailed) -> bool:
        if failure.exit_code is None:
            return False
        if failure.exit_code == EXIT_ADDR_IN_USE:
            return True
        lines = self._stderr_lines(since=child.spawned_wall)
        return any("address already in use" in line.lower() for line in lines)

    def _health_probe(self, child: Child) -> Callable[[float], Awaitable[bool]]:
        if self._backend.protocol == "http":
            return HttpBackend(child.host, child.port, self._backend.health_path).health
        address = child.address
        return lambda limit_s: grpc_health_once(address, limit_s)

    async def _load(self, child: Child, plan: LaunchPlan, race: StartRace) -> None:
        self._client = GrpcBackend(child.address)
        limit = max(race.ceiling_left(), 0.001)
        try:
            message = await race.run(
                child, self._client.load_model(plan.load_options, limit), "load"
            )
        except BackendCallError as exc:
            raise StartFailed("load", str(exc)) from None
        self._deps.logs.note(self._id, f"model loaded: {message}")

    async def _fail_start(self, failure: StartFailed) -> Unavailable:
        """Kill and reap what was started, then report FAILED with the backend's last words."""
        child = self._child
        if child is not None:
            child.signal_group(signal.SIGKILL)
            await child.wait_exited(KILL_WAIT_S)
            await self._finish_child(child)
        message = self._with_stderr(
            f"{self._name()} failed to start (phase {failure.phase}): {failure.detail}"
        )
        await self._transition(
            S.FAILED, f"{failure.phase} failed: {failure.detail}", last_error=message
        )
        return Unavailable(message)

    # exit watch

    async def _watch_exit(self, child: Child) -> None:
        code = await child.proc.wait()
        if self._state is not S.STOPPING:
            # What a dead backend leaves behind (workers) still holds memory.
            child.signal_group(signal.SIGKILL)
        await wait_tasks(child.pumps, PIPE_DRAIN_S)
        child.exit_code = code
        self._deps.logs.note(self._id, f"pid {child.pid} {describe_exit(code)}")
        child.exited.set()
        if child is self._child and self._state in (S.READY, S.DRAINING):
            await self._crashed(child, code)

    async def _crashed(self, child: Child, code: int) -> None:
        reason = describe_exit(code)
        # Whatever goes wrong while cleaning up, stop() and wait_terminal() wait on
        # `_terminal`: leaving it unset would hang them forever.
        try:
            await self._transition(
                S.FAILED,
                reason,
                last_error=self._with_stderr(f"{self._name()} {reason}"),
                settled=False,
            )
            await self._finish_child(child)
        except Exception:
            self._log.exception("replica_crash_cleanup_failed", pid=child.pid)
        finally:
            self._terminal.set()

    # stop

    async def _stop(self, reason: str, drain_timeout: float) -> None:
        if self._start_task is not None:
            # Every wait of a start races the stop request, so this is quick.
            await asyncio.wait((self._start_task,))
        if self._state is S.READY:
            await self._transition(S.DRAINING, reason)
            await self._drain(drain_timeout)
        if self._state in TERMINAL:
            await self._terminal.wait()
            return
        await self._transition(S.STOPPING, reason)
        survivors = await self._kill(self._child) if self._child else []
        if survivors:
            await self._transition(
                S.FAILED,
                "processes survived SIGKILL",
                last_error=f"{self._name()}: pids {survivors} survived SIGKILL while stopping",
            )
        else:
            await self._transition(S.STOPPED, reason)

    async def _drain(self, limit_s: float) -> None:
        if self._slots.count == 0 or self._forced.is_set():
            return
        waits: list[asyncio.Future[object]] = [asyncio.ensure_future(self._slots.wait_idle())]
        waits += [asyncio.ensure_future(e.wait()) for e in (self._forced, self._terminal)]
        try:
            await asyncio.wait(waits, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            discard(waits)
        if self._slots.count and self._state is S.DRAINING:
            self._log.warning(
                "replica_drain_cut_short", in_flight=self._slots.count, forced=self._forced.is_set()
            )

    async def _kill(self, child: Child) -> list[int]:
        """Free → SIGTERM the group → grace → SIGKILL the group → reap; returns survivors."""
        if self._client is not None and child.proc.returncode is None and not self._unresponsive:
            freed = await self._client.free(FREE_LIMIT_S)
            self._deps.logs.note(self._id, "model freed" if freed else "Free failed; stopping")
        child.signal_group(signal.SIGTERM)
        grace = self._backend.stop_grace
        if not await child.wait_group_exit(grace):
            self._log.warning("replica_stop_grace_expired", pid=child.pid, grace_s=grace)
            child.signal_group(signal.SIGKILL)
            await child.wait_exited(KILL_WAIT_S)
        return await self._finish_child(child)

    def _released(self, pids: list[int]) -> None:
        if self._gpu_ids and self._deps.on_released is not None:
            self._deps.on_released(self._id, self._gpu_ids, pids)

    async def _finish_child(self, child: Child) -> list[int]:
        survivors = await child.reap_group()
        if child is self._child and self._client is not None:
            await self._client.close()
            self._client = None
        if survivors:
            self._log.error("replica_processes_survived", pgid=child.pgid, pids=survivors)
        return survivors

    # output

    def _stderr_lines(self, since: float = 0.0) -> list[str]:
        lines = self._deps.logs.tail_lines(self._id, STDERR_TAIL * 10)
        texts = [ln.text for ln in lines if ln.stream == STDERR and ln.time >= since]
        return texts[-STDERR_TAIL:]

    def _with_stderr(self, message: str) -> str:
        lines = self._stderr_lines()
        if not lines:
            return f"{message}\n(the backend wrote nothing to stderr)"
        return f"{message}\nlast {len(lines)} stderr lines:\n" + "\n".join(lines)

    def _name(self) -> str:
        return f"replica {self._id} of model {self._spec.name!r} (backend {self._backend.name})"


def _retrieve(task: "asyncio.Task[None]") -> None:
    """Callers see the outcome through shield(); none of them may be left to log it."""
    if not task.cancelled():
        task.exception()
