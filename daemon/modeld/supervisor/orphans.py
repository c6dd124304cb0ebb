"""Clean-up at daemon start: backends an earlier daemon left behind.

PR_SET_PDEATHSIG kills a backend whose daemon died, and the sentinel of that
run (containment.py) kills everything else it started, so usually nothing is
left; this covers the rest (the sentinel was killed too, the host lost power
mid-sweep). Two sources, both stopped side by side, SIGTERM then SIGKILL:
- the registry's live rows: a row names a process by pid AND start time, so a
  pid now used by someone else is never touched;
- every process of this instance's boxes (its marker, its cgroups), whether or
  not its leader still runs: workers that left their group, grandchildren of a
  dead backend. Another modeld's processes carry another instance id.
"""

import asyncio
import contextlib
import os
import signal

import structlog

from modeld.clock import Clock, SystemClock
from modeld.ops.events import Event
from modeld.state import ReplicaState
from modeld.storage.registry import Registry, ReplicaRow
from modeld.supervisor import sweep
from modeld.supervisor.containment import Containment
from modeld.supervisor.process import (
    kill_group,
    proc_pgid,
    process_matches,
    wait_group_gone,
    wait_pids_gone,
)

log = structlog.get_logger(__name__)

REASON = "daemon_restart"
KILL_WAIT_S = 5.0


async def reap_orphans(
    registry: Registry,
    *,
    node_id: str = "local",
    grace: float = 5.0,
    clock: Clock | None = None,
    containment: Containment | None = None,
) -> list[str]:
    """Stop the process groups of live rows that still run, and every process an earlier
    run of this instance left in its boxes; mark every live row STOPPED.

    Returns the ids of the rows handled. Everything is stopped side by side, so a
    restart waits at most one grace period (plus a SIGKILL) however much there is.
    """
    clock = clock or SystemClock()
    rows = await registry.live_replicas(node_id)
    groups = {row.id: pgid for row in rows if (pgid := _live_group(row)) is not None}
    await asyncio.gather(
        *(_stop_group(row, groups[row.id], grace) for row in rows if row.id in groups),
        *([_stop_strays(containment, grace)] if containment is not None else []),
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


async def _stop_strays(containment: Containment, grace: float) -> None:
    """SIGTERM what earlier runs of this instance left in their boxes, grace, then SIGKILL."""
    found = await asyncio.to_thread(containment.earlier_members)
    if not found:
        await asyncio.to_thread(containment.sweep_earlier_runs, KILL_WAIT_S)
        return
    await asyncio.to_thread(_terminate, containment, found)
    exited = await wait_pids_gone(found, grace)
    survivors = await asyncio.to_thread(containment.sweep_earlier_runs, KILL_WAIT_S)
    emit = log.error if survivors else log.info
    emit(
        "orphans_swept",
        mechanism=containment.mechanism,
        pids=found,
        signal="SIGTERM" if exited else "SIGKILL",
        survivors=survivors,
    )


def _terminate(containment: Containment, found: list[int]) -> None:
    marked = set(sweep.marked_pids(containment.prefix))
    sweep.signal_marked(sorted(marked & set(found)), containment.prefix, signal.SIGTERM)
    for pid in set(found) - marked:
        # In a cgroup of ours but without our marker (it exec'd with a new environment).
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
