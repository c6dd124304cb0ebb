"""GPU memory of stopped replicas that the driver still holds.

A replica is STOPPED once every process in its box has exited, but the GPU
driver frees a process's memory a moment (for large contexts, seconds) later,
and until then NVML still lists the pid among the device's compute processes
and counts its memory as used. Admission must not start a new replica into
that memory, nor evict another replica because of it.

So the stop path hands over, per GPU replica, the pids its box ever held; an
entry stays here while NVML lists any of them on one of the replica's GPUs,
and is dropped when none is listed any more or `timeout_s` passes (logged:
a driver that keeps listing a dead pid, or a pid reused by another GPU process).
Admission calls `wait_released` before each planning round.

NVML has no change notification, so a wait re-reads the list every
`interval_s`; with nothing pending it reads nothing. NVML's pids are the host's:
inside a PID namespace they never match, and nothing is waited for.
"""

import asyncio
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog

from modeld.clock import Clock

log = structlog.get_logger(__name__)

RELEASE_TIMEOUT_S = 30.0
RELEASE_INTERVAL_S = 0.1


@dataclass(frozen=True)
class _Pending:
    gpu_ids: frozenset[int]
    pids: frozenset[int]
    since: float


class Releasing:
    """Stopped replicas whose processes a GPU still lists; one owner: this object."""

    def __init__(
        self,
        clock: Clock,
        listed: Callable[[], Mapping[int, set[int]]],
        *,
        timeout_s: float = RELEASE_TIMEOUT_S,
        interval_s: float = RELEASE_INTERVAL_S,
    ) -> None:
        self._clock = clock
        self._listed = listed
        self._timeout_s = timeout_s
        self._interval_s = interval_s
        self._pending: dict[str, _Pending] = {}

    def add(self, replica_id: str, gpu_ids: Iterable[int], pids: Iterable[int]) -> None:
        """A replica on `gpu_ids` has stopped; `pids` are every process it had."""
        gpus, procs = frozenset(gpu_ids), frozenset(pids)
        if gpus and procs:
            self._pending[replica_id] = _Pending(gpus, procs, self._clock.monotonic())

    async def held(self) -> dict[int, list[str]]:
        """Per GPU index, the stopped replicas whose memory is not free yet.

        Reads NVML's lists (in a thread) only when something is pending.
        """
        if not self._pending:
            return {}
        try:
            listed = await asyncio.to_thread(self._listed)
        except (OSError, ValueError) as exc:
            log.warning("gpu_processes_unreadable", error=str(exc))
            listed = {}
        return self.settle(listed)

    def settle(self, listed: Mapping[int, set[int]]) -> dict[int, list[str]]:
        """Drop what `listed` (pids per GPU) shows released or what timed out; the rest."""
        now = self._clock.monotonic()
        out: dict[int, list[str]] = {}
        for replica_id, entry in list(self._pending.items()):
            still = {g for g in entry.gpu_ids if entry.pids & listed.get(g, set())}
            waited = round(now - entry.since, 3)
            if not still:
                del self._pending[replica_id]
                log.info("gpu_memory_released", replica_id=replica_id, waited_s=waited)
            elif now - entry.since >= self._timeout_s:
                del self._pending[replica_id]
                log.warning(
                    "gpu_memory_release_timeout",
                    replica_id=replica_id,
                    gpus=sorted(still),
                    pids=sorted(entry.pids & set().union(*(listed[g] for g in still))),
                    waited_s=waited,
                )
            else:
                for gpu in still:
                    out.setdefault(gpu, []).append(replica_id)
        return out

    async def wait_released(self, deadline: float) -> None:
        """Return once no stopped replica's memory is held, or at `deadline` (monotonic)."""
        logged = False
        while held := await self.held():
            if self._clock.monotonic() >= deadline:
                return
            if not logged:
                logged = True
                log.info("admission_waiting_for_release", held={str(g): r for g, r in held.items()})
            await asyncio.sleep(min(self._interval_s, max(0.0, deadline - self._clock.monotonic())))
