"""Spawning one backend process of a replica, and reading what it left on stderr.

Mechanics only: the replica (replica.py) decides when to spawn and what a failure
means, and holds the `Child` this returns. `spawn_child` runs the launch plan on
a fresh port, starts the output pumps and the exit watch as tasks of the
replica's own (its `background`), and notes the command line in its log.
"""

import shlex
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from modeld.ops.logstore import STDERR, STDOUT, LogStore
from modeld.spec import BackendSpec
from modeld.supervisor.backend_client import Answer, HttpBackend, grpc_answer_once
from modeld.supervisor.child import Child
from modeld.supervisor.containment import Box
from modeld.supervisor.deps import ReplicaDeps
from modeld.supervisor.launch import LaunchPlan
from modeld.supervisor.ports import bind_failed
from modeld.supervisor.process import proc_start_time
from modeld.supervisor.readiness import StartFailed, probe_lines

STDERR_TAIL = 20
EXIT_ADDR_IN_USE = 98

# Starts a task of the replica's own (a fresh context bound to the replica).
Background = Callable[[Coroutine[Any, Any, None], str], "Any"]


async def spawn_child(
    deps: ReplicaDeps,
    box: Box,
    plan: LaunchPlan,
    *,
    replica_id: str,
    model: str,
    backend: BackendSpec,
    background: Background,
    watch: Callable[[Child], Coroutine[Any, Any, None]],
    on_gone: Callable[[list[int]], None],
) -> Child:
    """Spawn the plan on a port of `deps.ports`; raises StartFailed("spawn") when the
    command cannot be run. Returns with no await after the watch was started, so the
    caller holds the child before the watch first runs."""
    host = deps.host
    port = deps.ports(host)
    argv = plan.argv(host, port)
    deps.logs.open(replica_id, model, probe_line=probe_lines(backend))
    try:
        box.prepare()
        proc = await deps.spawner.spawn(argv, env=plan.env, cwd=plan.cwd, cgroup=box.cgroup)
    except OSError as exc:
        box.close()
        raise StartFailed("spawn", f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None
    clock = deps.clock
    child = Child(
        proc,
        host,
        port,
        clock.monotonic(),
        clock.wall(),
        proc_start_time(proc.pid),
        box,
        on_gone=on_gone,
    )
    pump = deps.logs.pump
    child.pumps = [
        background(
            pump(replica_id, name, pipe, max_line=backend.max_output_line), f"{name}-{replica_id}"
        )
        for name, pipe in ((STDOUT, proc.stdout), (STDERR, proc.stderr))
    ]
    child.watch = background(watch(child), f"exit-{replica_id}")
    deps.logs.note(replica_id, f"spawned pid {proc.pid}: {shlex.join(argv)}")
    return child


def health_probe(backend: BackendSpec, child: Child) -> Callable[[float], Awaitable[Answer]]:
    """One health call with a deadline, in the backend's protocol."""
    if backend.protocol == "http":
        return HttpBackend(child.host, child.port, backend.health_path).answer
    address = child.address
    return lambda limit_s: grpc_answer_once(address, limit_s)


def lost_port(logs: LogStore, replica_id: str, child: Child, failure: StartFailed) -> bool:
    """Whether `child` exited because its port was taken (worth a retry elsewhere)."""
    if failure.exit_code is None:
        return False
    if failure.exit_code == EXIT_ADDR_IN_USE:
        return True
    lines = stderr_lines(logs, replica_id, since=child.spawned_wall)
    return any(bind_failed(line) for line in lines)


def stderr_lines(logs: LogStore, replica_id: str, since: float = 0.0) -> list[str]:
    """The last stderr lines of the process spawned at wall time `since`, from every
    line kept of it (its head too), however much else it printed after them."""
    return _last(logs, replica_id, since, STDERR)


def with_stderr(logs: LogStore, replica_id: str, message: str, since: float = 0.0) -> str:
    """`message` followed by the last words of the process spawned at `since`: its last
    stderr lines or, when it wrote none, its last stdout lines (not probe access lines)."""
    lines = stderr_lines(logs, replica_id, since)
    if lines:
        return f"{message}\nlast {len(lines)} stderr lines:\n" + "\n".join(lines)
    lines = _last(logs, replica_id, since, STDOUT)
    if lines:
        return (
            f"{message}\n(the backend wrote nothing to stderr) last {len(lines)} stdout lines:\n"
            + "\n".join(lines)
        )
    return f"{message}\n(the backend wrote nothing to stderr or stdout)"


def _last(logs: LogStore, replica_id: str, since: float, stream: str) -> list[str]:
    probe = stream == STDOUT
    texts = [
        ln.text
        for ln in logs.lines_since(replica_id, since)
        if ln.stream == stream and not (probe and logs.is_probe_line(replica_id, ln.text))
    ]
    return texts[-STDERR_TAIL:]
