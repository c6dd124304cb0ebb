"""Which ready replica serves the next request.

Order: fewest in-flight leases, then least recently used, then most free memory on
the replica's device (its first GPU, or host RAM under key None), then id.
"""

from collections.abc import Mapping, Sequence

from modeld.policy.view import ReplicaView
from modeld.state import ReplicaState

SortKey = tuple[int, float, int, str]


def sort_key(replica: ReplicaView, free_memory: Mapping[int | None, int]) -> SortKey:
    """Smaller is better; the SQL form of the picker must order rows the same way."""
    free = free_memory.get(replica.device, 0)
    return (replica.in_flight, replica.last_used, -free, replica.id)


def pick_replica(
    replicas: Sequence[ReplicaView], free_memory: Mapping[int | None, int]
) -> ReplicaView | None:
    """The best READY replica, or None when there is none."""
    ready = [r for r in replicas if r.state is ReplicaState.READY]
    if not ready:
        return None
    return min(ready, key=lambda r: sort_key(r, free_memory))
