"""Clean-up at daemon start: backends an earlier daemon left behind.

PR_SET_PDEATHSIG already kills a backend whose daemon died, so usually nothing
is left; this covers the rest (a backend that escaped it, a daemon stopped in a
way the kernel did not see). A row names a process by pid AND start time; a pid
now used by someone else is never touched.
"""

import asyncio
import signal

import structlog

from modeld.clock import Clock, SystemClock
from modeld.ops.events import Event
from modeld.state import ReplicaState
from modeld.storage.registry import Registry, ReplicaRow
from modeld.supervisor.process import kill_group, proc_pgid, process_matches, wait_group_gone

log = structlog.get_logger(__name__)

REASON = "daemon_restart"
KILL_WAIT_S = 5.0


async def reap_orphans(
    registry: Registry,
    *,
    node_id: str = "local",
    grace: float = 5.0,
    clock: Clock | None = None,
) -> list[str]:
    """Stop the process groups of live rows that still run; mark every live row STOPPED.

    Returns the ids of the rows handled. The groups are stopped side by side, so
    a restart waits at most one grace period however many there are.
    """
    clock = clock or SystemClock()
    rows = await registry.live_replicas(node_id)
    groups = {row.id: pgid for row in rows if (pgid := _live_group(row)) is not None}
    await asyncio.gather(
        *(_stop_group(row, groups[row.id], grace) for row in rows if row.id in groups)
    )
    for row in rows:
        wall = clock.wall()
        await registry.update_replica(
            row.id, state=ReplicaState.STOPPED.value, stopped_at=wall, last_error=REASON
        )
        await registry.add_event(
            Event(wall, row.id, row.model, ReplicaState(row.state), ReplicaState.STOPPED, REASON)
        )
    return [row.id for row in rows]


def _live_group(row: ReplicaRow) -> int | None:
    """The group to stop: the row's very process still runs and still leads it."""
    if row.pid is None or row.proc_start is None or not process_matches(row.pid, row.proc_start):
        return None
    pgid = proc_pgid(row.pid)
    if pgid is None or pgid != row.pgid:
        log.warning(
            "orphan_left_alone",
            replica_id=row.id,
            pid=row.pid,
            pgid=pgid,
            recorded_pgid=row.pgid,
            why="the process is no longer in the group it was started in",
        )
        return None
    return pgid


async def _stop_group(row: ReplicaRow, pgid: int, grace: float) -> None:
    kill_group(pgid, signal.SIGTERM)
    survivors = await wait_group_gone(pgid, grace)
    sent = "SIGTERM"
    if survivors:
        sent = "SIGKILL"
        kill_group(pgid, signal.SIGKILL)
        survivors = await wait_group_gone(pgid, KILL_WAIT_S)
    emit = log.error if survivors else log.info
    emit(
        "orphan_stopped",
        replica_id=row.id,
        model=row.model,
        pid=row.pid,
        pgid=pgid,
        signal=sent,
        survivors=survivors,
    )
