"""The stop ladder of one backend process, and the drain before it.

Mechanics only: the replica (replica.py) decides when to drain and stop, moves
its state, and reaps what is left (`Child.reap_group`) once this returns.
"""

import asyncio
import signal

import structlog

from modeld.ops.logstore import LogStore
from modeld.supervisor.backend_client import GrpcBackend
from modeld.supervisor.child import KILL_WAIT_S, Child, discard
from modeld.supervisor.slots import Slots

FREE_LIMIT_S = 2.0


async def drain(
    slots: Slots,
    limit_s: float,
    *,
    forced: asyncio.Event,
    terminal: asyncio.Event,
) -> None:
    """Until every slot is given back, the stop is forced, the replica ends, or `limit_s`."""
    if slots.count == 0 or forced.is_set():
        return
    waits: list[asyncio.Future[object]] = [asyncio.ensure_future(slots.wait_idle())]
    waits += [asyncio.ensure_future(e.wait()) for e in (forced, terminal)]
    try:
        await asyncio.wait(waits, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        discard(waits)


async def terminate(
    child: Child,
    client: GrpcBackend | None,
    grace_s: float,
    *,
    logs: LogStore,
    replica_id: str,
    log: structlog.typing.FilteringBoundLogger,
) -> None:
    """Free (when there is a client to ask) → SIGTERM the group → grace → SIGKILL the
    group. `client=None` also for a backend that stopped answering: Free would only
    wait out its deadline."""
    if client is not None and child.proc.returncode is None:
        freed = await client.free(FREE_LIMIT_S)
        logs.note(replica_id, "model freed" if freed else "Free failed; stopping")
    child.signal_group(signal.SIGTERM)
    if not await child.wait_group_exit(grace_s):
        log.warning("replica_stop_grace_expired", pid=child.pid, grace_s=grace_s)
        child.signal_group(signal.SIGKILL)
        await child.wait_exited(KILL_WAIT_S)
