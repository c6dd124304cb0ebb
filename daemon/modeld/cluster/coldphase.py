"""One start of a model across the cluster, as a state machine: its phases and edges.

A cold start (a Route that found no READY replica anywhere) begins CLAIMING: it takes
the model's claim, or waits while another start holds it. With the claim, this modeld
is PLACING: it asks hosts in placement order, and one is LOADING the replica (a
refusal: PLACING again, the next host). Once loaded it is SEEING: the replica is
published under the claim and the start waits for it to be READY in sight. A start
whose claim was lost meanwhile is CLAIMING again (whoever took it over starts the
model). A scale-up holds its claim from the start, so it begins PLACING.

`ColdStarts` (coldstart.py) owns every `Start` and drives it; each phase change goes
through `Start.to`, which checks the edge and logs it once (`cluster_start_phase`).
"""

import asyncio
from dataclasses import dataclass, field
from enum import StrEnum

import structlog

from modeld.info import RemoteReplica

log = structlog.get_logger(__name__)


class Phase(StrEnum):
    CLAIMING = "claiming"
    PLACING = "placing"
    LOADING = "loading"
    SEEING = "seeing"
    READY = "ready"
    FAILED = "failed"


P = Phase
ALLOWED: dict[Phase, frozenset[Phase]] = {
    P.CLAIMING: frozenset({P.PLACING, P.READY, P.FAILED}),
    P.PLACING: frozenset({P.LOADING, P.CLAIMING, P.FAILED}),
    P.LOADING: frozenset({P.SEEING, P.PLACING, P.CLAIMING, P.FAILED}),
    P.SEEING: frozenset({P.READY, P.CLAIMING, P.FAILED}),
    P.READY: frozenset(),
    P.FAILED: frozenset(),
}


class BadEdge(AssertionError):
    """A start was driven along an edge the table does not have: a bug, not an outcome."""


@dataclass(eq=False)
class Start:
    """One start of `model` on this modeld. `until`: the latest deadline of the Routes
    waiting on it; `stale`: the remote READY replicas in sight when it began (the Route
    could not reach them, so only a new one ends a wait)."""

    model: str
    kind: str  # "cold" (a Route's) or "scale-up"
    until: float = 0.0
    stale: frozenset[RemoteReplica] = frozenset()
    phase: Phase = Phase.CLAIMING
    task: "asyncio.Task[None] | None" = field(default=None, repr=False)

    def to(self, phase: Phase, **why: object) -> None:
        """The one way a start changes phase: checked against ALLOWED, logged once."""
        if phase is self.phase:
            return
        if phase not in ALLOWED[self.phase]:
            raise BadEdge(f"start of {self.model!r}: {self.phase} -> {phase} is no edge")
        log.info(
            "cluster_start_phase",
            model=self.model,
            kind=self.kind,
            from_phase=self.phase.value,
            to_phase=phase.value,
            **why,
        )
        self.phase = phase
