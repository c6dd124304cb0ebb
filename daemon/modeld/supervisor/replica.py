"""One replica: the single owner of one backend process and of its state.

STARTING → WAITING_READY → LOADING → READY → DRAINING → STOPPING → STOPPED, or
FAILED. Only `_transition` assigns the state; it checks the edge, stamps the
time, logs once, writes the row and publishes the event.

Three tasks may act on a replica, and each owns a slice of its life:
- the start task (`ensure_ready`) owns the starting states, port retries included,
  and reports a failed start: it runs the start sequence (starting.py), lent the
  transition method and the rest of what a start does to the replica;
- the exit watch of each process notices its exit at once; it reports a crash
  only of a READY or DRAINING replica (during a start the start task reports it,
  during STOPPING the exit was asked for);
- the stop task (`stop`) waits for the start task to give up (every wait of a
  start races the stop request), then drains, stops and reaps.

The mechanics live beside it, free of its state: spawning a process and reading
its stderr (spawning.py), the waits of a start (readiness.py), the drain and the
stop ladder (stopping.py), the row and the events (record.py), what every replica
is built with (deps.py).
"""

import asyncio
import contextvars
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import structlog

from modeld.errors import Unavailable
from modeld.spec import BackendSpec, ModelSpec
from modeld.state import ALLOWED, TERMINAL, ReplicaState
from modeld.storage.registry import ReplicaRow
from modeld.supervisor.backend_client import GrpcBackend, port_refuses
from modeld.supervisor.child import PIPE_DRAIN_S, Child, describe_exit, wait_tasks
from modeld.supervisor.deps import ReplicaDeps
from modeld.supervisor.launch import LaunchPlan
from modeld.supervisor.readiness import StartRace, StopRequested
from modeld.supervisor.record import ReplicaRecord
from modeld.supervisor.slots import Slots
from modeld.supervisor.spawning import health_probe, spawn_child, with_stderr
from modeld.supervisor.starting import StartHooks, StartSequence
from modeld.supervisor.stopping import drain, terminate

__all__ = ["Replica", "ReplicaDeps", "StateListener"]

S = ReplicaState
T = TypeVar("T")
log = structlog.get_logger(__name__)

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
        self._record = ReplicaRecord(
            replica_id,
            spec.name,
            registry=deps.registry,
            events=deps.events,
            row=self._row,
            log=self._log,
        )
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
    def backend(self) -> BackendSpec:
        return self._backend

    @property
    def probe_timeout(self) -> float:
        return self._backend.probe_limit

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

        Raises Unavailable when the start fails or the replica is stopped,
        InvalidArgument when its spec cannot be started at all, and FailedPrecondition
        when its backend's health path is wrong. Cancelling one
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
        return (await health_probe(self._backend, child)(limit_s)).ok

    async def refuses(self) -> bool:
        """Whether the backend's port refuses connections now: proof that nothing
        listens there any more (a busy server still accepts, and answers late)."""
        child = self._child
        if child is None or child.exited.is_set():
            return True
        return await port_refuses(child.host, child.port, self._backend.probe_limit)

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
        await self._record.changed(changes)
        await self._record.publish(old, new, reason, wall)
        if new in TERMINAL:
            self._deps.logs.close(self._id)
            if settled:
                self._terminal.set()

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
        hooks = StartHooks(
            state=lambda: self._state,
            child=lambda: self._child,
            transition=self._transition,
            spawn=self._spawn,
            finish=self._finish_child,
            hold_client=self._hold_client,
        )
        sequence = StartSequence(
            replica_id=self._id,
            name=self._name(),
            spec=self._spec,
            backend=self._backend,
            deps=self._deps,
            gpu_ids=self._gpu_ids,
            owner=self._box.owner,
            race=race,
            hooks=hooks,
            log=self._log,
        )
        await sequence.run()

    async def _spawn(self, plan: LaunchPlan, restarts: int) -> Child:
        if self._stop_requested.is_set():
            raise StopRequested
        child = await spawn_child(
            self._deps,
            self._box,
            plan,
            replica_id=self._id,
            model=self.model,
            backend=self._backend,
            background=self._background,
            watch=self._watch_exit,
            on_gone=self._released,
        )
        # Held before the first await, so the exit watch always finds it current.
        self._child = child
        self._restarts = restarts
        if self._started_at is None:
            self._started_at = child.spawned_wall
        await self._record.spawned(child, restarts)
        return child

    def _hold_client(self, client: GrpcBackend) -> None:
        self._client = client

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
                last_error=with_stderr(
                    self._deps.logs, self._id, f"{self._name()} {reason}", child.spawned_wall
                ),
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
        cut_short = None
        if self._state is S.READY:
            await self._transition(S.DRAINING, reason)
            cut_short = await self._drain(drain_timeout)
        if self._state in TERMINAL:
            await self._terminal.wait()
            return
        # Leases cut short are the one thing the unloader cannot see otherwise: it is
        # kept as the replica's last error, which Unload's reply carries.
        await self._transition(S.STOPPING, reason, last_error=cut_short)
        survivors = await self._kill(self._child) if self._child else []
        if survivors:
            await self._transition(
                S.FAILED,
                "processes survived SIGKILL",
                last_error=f"{self._name()}: pids {survivors} survived SIGKILL while stopping",
            )
        else:
            await self._transition(S.STOPPED, reason)

    async def _drain(self, limit_s: float) -> str | None:
        """Wait for the leases; says how many were cut short unless none were or the
        stop was forced (then cutting them was what was asked for)."""
        await drain(self._slots, limit_s, forced=self._forced, terminal=self._terminal)
        out, forced = self._slots.count, self._forced.is_set()
        if not out or self._state is not S.DRAINING:
            return None
        self._log.warning("replica_drain_cut_short", in_flight=out, forced=forced)
        if forced:
            return None
        return f"drain cut short: {out} lease(s) still out after {limit_s:g}s were ended"

    async def _kill(self, child: Child) -> list[int]:
        """The stop ladder, then reap; returns the pids that survived SIGKILL."""
        client = None if self._unresponsive else self._client
        grace = self._backend.stop_grace
        await terminate(
            child, client, grace, logs=self._deps.logs, replica_id=self._id, log=self._log
        )
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

    def _name(self) -> str:
        return f"replica {self._id} of model {self._spec.name!r} (backend {self._backend.name})"


def _retrieve(task: "asyncio.Task[None]") -> None:
    """Callers see the outcome through shield(); none of them may be left to log it."""
    if not task.cancelled():
        task.exception()
