"""The replica state machine: states and the only edges a replica may take."""

from enum import StrEnum


class ReplicaState(StrEnum):
    # A start waiting in admission: no replica (no process) exists yet. Only the pool's
    # pending starts carry it; a replica's own state machine never enters it.
    ADMITTING = "ADMITTING"
    STARTING = "STARTING"
    WAITING_READY = "WAITING_READY"
    LOADING = "LOADING"
    READY = "READY"
    DRAINING = "DRAINING"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    FAILED = "FAILED"


S = ReplicaState

ALLOWED: dict[ReplicaState, frozenset[ReplicaState]] = {
    S.ADMITTING: frozenset(),
    S.STARTING: frozenset({S.WAITING_READY, S.STOPPING, S.FAILED}),
    S.WAITING_READY: frozenset({S.LOADING, S.READY, S.STOPPING, S.FAILED}),
    S.LOADING: frozenset({S.READY, S.STOPPING, S.FAILED}),
    S.READY: frozenset({S.DRAINING, S.STOPPING, S.FAILED}),
    S.DRAINING: frozenset({S.STOPPING, S.FAILED}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.STOPPED: frozenset(),
    S.FAILED: frozenset(),
}

# Replicas in these states hold (or are about to hold) a process and its memory.
LIVE = frozenset({S.STARTING, S.WAITING_READY, S.LOADING, S.READY, S.DRAINING, S.STOPPING})
# Starting states count against max_loaded just like READY ones.
STARTING_STATES = frozenset({S.STARTING, S.WAITING_READY, S.LOADING})
TERMINAL = frozenset({S.STOPPED, S.FAILED})


def can_transition(src: ReplicaState, dst: ReplicaState) -> bool:
    return dst in ALLOWED[src]
