"""The waits of one start (supervisor/readiness.py), driven without a process."""

import asyncio
import itertools
from types import SimpleNamespace
from typing import cast

from modeld.clock import SystemClock
from modeld.ops.logstore import LogStore
from modeld.spec import BackendSpec
from modeld.supervisor.backend_client import Answer, Verdict
from modeld.supervisor.child import Child
from modeld.supervisor.readiness import PROBE_BACKOFF, PROBE_CAP_S, PROBE_FIRST_S, StartRace

PROBES = 8
# asyncio may run a timer up to its clock resolution early.
EARLY_S = 0.001


def _pauses(n: int) -> list[float]:
    pauses, delay = [], PROBE_FIRST_S
    for _ in range(n):
        pauses.append(delay)
        delay = min(delay * PROBE_BACKOFF, PROBE_CAP_S)
    return pauses


async def test_probes_keep_their_pace_after_the_log_store_closes() -> None:
    """Defect 6: at shutdown the log store closes before the router stops the replicas;
    each pause between probes then returned at once (its output subscription had ended),
    and the start probed in a tight loop until it was stopped."""
    clock = SystemClock()
    logs = LogStore(clock)
    logs.open("r1", "m")
    race = StartRace(
        clock=clock,
        logs=logs,
        replica_id="r1",
        backend=BackendSpec(name="echo", command=("echo",)),
        stop_requested=asyncio.Event(),
    )
    child = cast(Child, SimpleNamespace(exited=asyncio.Event(), spawned_at=clock.monotonic()))
    loop = asyncio.get_running_loop()
    probed: list[float] = []

    async def probe(limit_s: float) -> Answer:
        probed.append(loop.time())
        if len(probed) == 1:
            logs.close_all()
        return Answer(Verdict.READY if len(probed) == PROBES else Verdict.NO_ANSWER)

    await asyncio.wait_for(race.wait_healthy(child, probe), 10)

    gaps = [later - earlier for earlier, later in itertools.pairwise(probed)]
    for gap, pause in zip(gaps, _pauses(PROBES - 1), strict=True):
        assert gap >= pause - EARLY_S, f"probed again after {gap * 1000:.2f} ms, not {pause}"
