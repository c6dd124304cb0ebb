"""Read-only snapshots handed to the API and the CLI; never mutated after creation."""

from dataclasses import dataclass

from modeld.state import ReplicaState


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    id: str
    model: str
    backend: str
    state: ReplicaState
    address: str = ""
    pid: int | None = None
    in_flight: int = 0
    last_used: float | None = None  # wall clock
    started_at: float | None = None
    ready_at: float | None = None
    gpu: str = ""
    last_error: str = ""
    restarts: int = 0
    memory: int = 0
    last_probe_ok: bool = False
    last_probe_at: float | None = None
    node_id: str = "local"
    live_leases: int = 0
    # Why the router suspects this READY replica (routing/judge.py); empty when it does not.
    suspect: str = ""
    # What a `load_metrics` backend reported at the last scrape; None: no report.
    load_waiting: int | None = None
    load_running: int = 0
    kv_cache_usage: float | None = None
