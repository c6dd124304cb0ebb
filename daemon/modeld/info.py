"""Read-only snapshots handed to the API and the CLI; never mutated after creation.

What the routing interface (`modeld.frontend`) answers in, one host or many: the
API converts these to protobuf and never needs to know where they came from.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from modeld.state import ReplicaState

# The metadata key of a call one modeld forwarded to another. Over a RouteStream,
# where a message has no metadata, the marker travels in the request's `forwarded`
# field, and the API hands it to the frontend under this key all the same.
FORWARDED = "modeld-forwarded"


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
    # The host that runs it, in a cluster ("" on one host).
    host_id: str = ""


@dataclass(frozen=True, slots=True)
class QueueInfo:
    model: str
    length: int
    parallel: int
    queue_max: int
    oldest_wait: float  # seconds; 0 when none waits


class Grant(NamedTuple):
    """A Route's answer: the lease on a ready replica, here or on another host.

    A tuple: one is made on every warm Route, and a tuple is the cheapest record."""

    lease_id: str
    replica_id: str
    address: str
    protocol: str
    expires_wall: float
    cold_start: bool = False
    # In a cluster: the modeld that holds the lease (Release and RenewLease may go there).
    owner_address: str = ""
    # Forwarded Routes (modeld to modeld): the replica's in-flight on its owner after
    # the call, and whether the owner declined because its replica was no less loaded.
    owner_in_flight: int = 0
    declined: bool = False


@dataclass(frozen=True, slots=True)
class LinkState:
    up: bool
    # Wall-clock seconds since which the link has been down (None while up).
    down_since: float | None
    error: str
    where: str
    attempts: int


class HostState(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class HostEntry:
    host_id: str
    epoch: int
    address: str
    role: str
    labels: Mapping[str, str]
    state: HostState
    replicas: int
    gpu_free: tuple[int, ...]  # bytes per GPU as the host published them; () until it does
    gpu_total: tuple[int, ...]
    ram_free: int  # 0: not published yet
    ram_total: int
    lease_remaining: float | None  # None: not known (this host, not registered yet)
    heartbeat_age: float | None
    local: bool


@dataclass(frozen=True, slots=True)
class RemoteReplica:
    id: str
    host_id: str
    epoch: int
    model: str
    state: ReplicaState
    address: str
    generation: int
    in_flight: int
    last_used: float  # wall clock seconds
    free_memory: int

    def listed(self) -> ReplicaInfo:
        """As ListReplicas shows it: what the host publishes (no pid, GPU, memory or probe)."""
        return ReplicaInfo(
            id=self.id,
            model=self.model,
            backend="",
            state=self.state,
            address=self.address,
            in_flight=self.in_flight,
            last_used=self.last_used or None,
            restarts=self.generation,
            host_id=self.host_id,
        )


class Listing(NamedTuple):
    """ListReplicas: this host's replicas, then other hosts' as the view shows them,
    and this host's queues."""

    replicas: list[ReplicaInfo]
    queues: list[QueueInfo]
