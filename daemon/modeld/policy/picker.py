"""Which ready replica serves the next request.

Only a replica below its model's `parallel` leases takes one (policy/capacity.py).
Order: fewest in-flight leases, then least recently used, then most free memory on
the replica's device (its first GPU, or host RAM under key None), then id.

Last use is compared on a microsecond grid: a remote replica's comes as published
wall-clock seconds, and the grid makes near ties the same tie in both.

Two inputs refine it (both None: the order above, unchanged): `load`, what the
backends report (policy/load.py), skips saturated replicas and puts fewer
waiting + running first; `affinity`, a Route's key (policy/affinity.py), picks the
key's replica on the ring, within the bound on its leases, among those left.
"""

from collections.abc import Mapping, Sequence

from modeld.policy.affinity import AffinityInput, pick_affine
from modeld.policy.capacity import has_room
from modeld.policy.load import LoadInput
from modeld.policy.view import ReplicaView
from modeld.state import ReplicaState

SortKey = tuple[int, int, int, str]
TICKS_PER_SECOND = 1_000_000


def used_tick(seconds: float) -> int:
    """A time on the microsecond grid on which last use is compared."""
    return round(seconds * TICKS_PER_SECOND)


def free_on_device(replica: ReplicaView, free_memory: Mapping[int | None, int]) -> int:
    return free_memory.get(replica.device, 0)


def rank(in_flight: int, last_used: float, free: int, replica_id: str) -> SortKey:
    """The order of the picker, smaller first: this host's replicas and (by what their
    hosts publish) other hosts' alike (policy/cluster_route.py)."""
    return (in_flight, used_tick(last_used), -free, replica_id)


def sort_key(replica: ReplicaView, free_memory: Mapping[int | None, int]) -> SortKey:
    return rank(
        replica.in_flight, replica.last_used, free_on_device(replica, free_memory), replica.id
    )


def pick_replica(
    replicas: Sequence[ReplicaView],
    free_memory: Mapping[int | None, int],
    parallel: int = 0,
    *,
    load: LoadInput | None = None,
    affinity: AffinityInput | None = None,
) -> ReplicaView | None:
    """The best READY replica with room under `parallel`, or None when there is none."""
    ready: Sequence[ReplicaView] = [
        r for r in replicas if r.state is ReplicaState.READY and has_room(r.in_flight, parallel)
    ]
    if not ready:
        return None
    if load is not None:
        ready = load.unsaturated(ready)
    if affinity is not None:
        leases = {r.id: r.in_flight for r in ready}
        chosen = pick_affine(affinity.ring, affinity.key, leases, affinity.slack)
        if chosen is not None:
            return next(r for r in ready if r.id == chosen)
    if load is not None:
        return min(ready, key=lambda r: (load.score(r), sort_key(r, free_memory)))
    return min(ready, key=lambda r: sort_key(r, free_memory))
