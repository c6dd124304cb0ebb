"""A replica's durable trace: its registry row and its events.

The replica decides and keeps its state in memory; this writes what it decided.
It owns one fact: whether the row exists yet (the first write inserts it, every
later one updates it). A state change that cannot be written is logged and not
raised: the process really changed, and a registry that cannot write must not
also hide that from the rest of the daemon. A spawn that cannot be written is
raised: a process nobody can find after a crash of the daemon must not run.
"""

from collections.abc import Callable

import structlog

from modeld.errors import Unavailable
from modeld.ops.events import Event, EventBus
from modeld.state import ReplicaState
from modeld.storage.registry import Registry, ReplicaRow
from modeld.supervisor.child import Child


class ReplicaRecord:
    def __init__(
        self,
        replica_id: str,
        model: str,
        *,
        registry: Registry,
        events: EventBus,
        row: Callable[[], ReplicaRow],
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._id = replica_id
        self._model = model
        self._registry = registry
        self._events = events
        self._row = row  # the replica's current row, built on demand
        self._log = log
        self._row_written = False

    async def changed(self, changes: dict[str, object]) -> None:
        """Write a state change (logged, not raised, when the registry cannot)."""
        try:
            if self._row_written:
                await self._registry.update_replica(self._id, **changes)
            else:
                await self._registry.insert_replica(self._row())
                self._row_written = True
        except Unavailable as exc:
            self._log.error("replica_row_not_written", error=str(exc))

    async def spawned(self, child: Child, restarts: int) -> None:
        """Make the process durable before anyone hears of the replica (raises
        Unavailable); the first spawn also announces the replica as STARTING."""
        if self._row_written:
            await self._registry.update_replica(
                self._id,
                address=child.address,
                pid=child.pid,
                pgid=child.pgid,
                proc_start=child.proc_start,
                restarts=restarts,
            )
            return
        await self._registry.insert_replica(self._row())
        self._row_written = True
        await self.publish(
            None, ReplicaState.STARTING, f"spawned pid {child.pid}", child.spawned_wall
        )

    async def publish(
        self, old: ReplicaState | None, new: ReplicaState, reason: str, wall: float
    ) -> None:
        event = Event(wall, self._id, self._model, old, new, reason)
        self._events.publish(event)
        try:
            await self._registry.add_event(event)
        except Unavailable as exc:
            self._log.error("replica_event_not_written", error=str(exc))
