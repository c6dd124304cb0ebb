"""The data the policies take: immutable snapshots built by their owners.

Times are monotonic seconds; memory is in bytes.
"""

from dataclasses import dataclass

from modeld.state import ReplicaState


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """One replica as the policies see it, copied out of the router's hot state."""

    id: str
    model: str
    state: ReplicaState
    in_flight: int
    # When the last lease ended, or when it became READY if it was never used.
    last_used: float
    # When the replica last became idle; None while a lease is active.
    idle_since: float | None
    # Start of the oldest active lease; None when there is none.
    oldest_lease_started: float | None
    gpu_ids: tuple[int, ...]
    # Measured, or the spec's estimate while nothing has been measured.
    memory: int
    pinned: bool
    groups: tuple[str, ...]
    # Model overrides: None means "use the settings"; 0 means never/off.
    idle_ttl: float | None
    busy_timeout: float | None

    @property
    def device(self) -> int | None:
        """The GPU whose memory this replica is accounted on; None for host RAM."""
        return self.gpu_ids[0] if self.gpu_ids else None


@dataclass(frozen=True, slots=True)
class GpuView:
    index: int
    uuid: str
    name: str
    total: int
    used: int

    @property
    def free(self) -> int:
        return max(self.total - self.used, 0)


@dataclass(frozen=True, slots=True)
class HostView:
    ram_total: int
    ram_available: int
    gpus: tuple[GpuView, ...]

    def gpu(self, index: int) -> GpuView | None:
        return next((g for g in self.gpus if g.index == index), None)
