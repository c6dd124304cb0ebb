"""The start sequence of one replica: plan, spawn, wait for health (on a fresh port
while the last one was taken), load the model over gRPC, say READY; or kill and
reap what was started and say FAILED with the backend's last words.

The replica (replica.py) runs `StartSequence.run` as its start task and keeps
everything it owns: the state, the child, the client. It lends the sequence, as
`StartHooks`, exactly what a start does to it: its one transition method,
spawning a child that it holds, reaping a child, holding the backend client.
Every wait races the process exit, a stop request and the deadline
(readiness.StartRace).
"""

import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from modeld.errors import FailedPrecondition, InvalidArgument, Unavailable
from modeld.spec import BackendSpec, ModelSpec
from modeld.state import ReplicaState
from modeld.supervisor.backend_client import BackendCallError, GrpcBackend
from modeld.supervisor.child import KILL_WAIT_S, Child
from modeld.supervisor.deps import ReplicaDeps
from modeld.supervisor.launch import LaunchPlan, plan_launch
from modeld.supervisor.readiness import StartFailed, StartRace, StopRequested, exit_failure
from modeld.supervisor.spawning import health_probe, lost_port, with_stderr

S = ReplicaState
_PHASE = {S.STARTING: "spawn", S.WAITING_READY: "ready", S.LOADING: "load"}


class Transition(Protocol):
    async def __call__(
        self, new: ReplicaState, reason: str, *, last_error: str | None = None
    ) -> None: ...


@dataclass(frozen=True)
class StartHooks:
    """What the replica lends its start task; every one runs on the replica's own state."""

    state: Callable[[], ReplicaState]
    child: Callable[[], Child | None]  # the newest child spawned, once the replica holds it
    transition: Transition  # the replica's one transition method
    spawn: Callable[[LaunchPlan, int], Awaitable[Child]]  # (plan, restarts): a held child
    finish: Callable[[Child], Awaitable[list[int]]]  # reap a child; returns survivors
    hold_client: Callable[[GrpcBackend], None]


@dataclass(frozen=True)
class StartSequence:
    replica_id: str
    name: str  # how messages name the replica
    spec: ModelSpec
    backend: BackendSpec
    deps: ReplicaDeps
    gpu_ids: tuple[int, ...]
    owner: str  # the box's owner marker, passed to the backend's environment
    race: StartRace
    hooks: StartHooks
    log: structlog.typing.FilteringBoundLogger

    async def run(self) -> None:
        """Return once READY; raise InvalidArgument (cannot be started as specified)
        or Unavailable (stopped while starting, or the start failed), FailedPrecondition
        (the server says its health path does not exist)."""
        try:
            plan = plan_launch(
                self.spec,
                self.backend,
                self.deps.models_dir,
                python=self.deps.python,
                base_env=os.environ,
                gpu_ids=self.gpu_ids,
                owner=self.owner,
            )
        except InvalidArgument as exc:
            await self.hooks.transition(
                S.FAILED, "cannot be started as specified", last_error=str(exc)
            )
            raise
        try:
            await self._bring_up(plan)
        except StopRequested:
            raise Unavailable(f"{self.name} was stopped while starting") from None
        except StartFailed as failure:
            raise await self._fail(failure) from None
        except Exception as exc:
            # A registry failure or a bug must not leave a half-started process behind.
            phase = _PHASE.get(self.hooks.state(), "spawn")
            internal = StartFailed(phase, f"{type(exc).__name__}: {exc}")
            raise await self._fail(internal) from exc

    async def _bring_up(self, plan: LaunchPlan) -> None:
        child = await self._spawn_until_healthy(plan)
        if self.backend.protocol == "grpc":
            await self.hooks.transition(S.LOADING, "healthy; loading the model")
            await self._load(child, plan)
        if child.exited.is_set():
            raise exit_failure(child, _PHASE[self.hooks.state()])
        elapsed = self.race.elapsed()
        await self.hooks.transition(S.READY, f"ready at {child.address} after {elapsed:.3f}s")
        self.deps.logs.note(self.replica_id, f"ready at {child.address} after {elapsed:.3f}s")

    async def _spawn_until_healthy(self, plan: LaunchPlan) -> Child:
        """Spawn and wait for health, on a fresh port while the last one was taken."""
        attempt = 1
        while True:
            child = await self.hooks.spawn(plan, attempt - 1)
            if self.hooks.state() is S.STARTING:
                await self.hooks.transition(S.WAITING_READY, f"spawned pid {child.pid}")
            try:
                await self.race.wait_healthy(child, health_probe(self.backend, child))
            except StartFailed as failure:
                lost = lost_port(self.deps.logs, self.replica_id, child, failure)
                if attempt >= self.backend.start_attempts or not lost:
                    raise
                self.log.warning("replica_port_taken", port=child.port, attempt=attempt)
                self.deps.logs.note(self.replica_id, f"port {child.port} was taken; trying another")
                await self.hooks.finish(child)
                attempt += 1
            else:
                return child

    async def _load(self, child: Child, plan: LaunchPlan) -> None:
        client = GrpcBackend(child.address)
        # Held before the call, so a failed start closes it with the child.
        self.hooks.hold_client(client)
        limit = max(self.race.ceiling_left(), 0.001)
        try:
            message = await self.race.run(child, client.load_model(plan.load, limit), "load")
        except BackendCallError as exc:
            raise StartFailed("load", str(exc)) from None
        self.deps.logs.note(self.replica_id, f"model loaded: {message}")

    async def _fail(self, failure: StartFailed) -> Unavailable | FailedPrecondition:
        """Kill and reap what was started, then report FAILED with the backend's last words:
        FailedPrecondition when the configuration itself is wrong (no retry can mend it)."""
        child = self.hooks.child()
        if child is not None:
            child.signal_group(signal.SIGKILL)
            await child.wait_exited(KILL_WAIT_S)
            await self.hooks.finish(child)
        detail = f"{self.name} failed to start (phase {failure.phase}): {failure.detail}"
        if failure.phase == "spawn":
            # No process ever ran, so there is no stderr to quote: the command is wrong.
            where = f"backends.{self.backend.name}.command"
            message = f"{detail}\n(no process was started: check {where})"
        else:
            since = child.spawned_wall if child is not None else 0.0
            message = with_stderr(self.deps.logs, self.replica_id, detail, since)
        await self.hooks.transition(
            S.FAILED, f"{failure.phase} failed: {failure.detail}", last_error=message
        )
        return FailedPrecondition(message) if failure.misconfigured else Unavailable(message)
