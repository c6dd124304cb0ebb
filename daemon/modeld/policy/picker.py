"""Which ready replica serves the next request.

Only a replica below its model's `parallel` leases takes one (policy/capacity.py).
Order: fewest in-flight leases, then least recently used, then most free memory on
the replica's device (its first GPU, or host RAM under key None), then id.

The registry holds the same policy as SQL (`registry.PICK_SQL`) over rows written
by `counter_row`. Last use is compared on a microsecond grid in both forms: the
registry stores it as wall-clock seconds, and adding the wall-clock offset to raw
monotonic floats could round two distinct values to one (or keep two apart that
the grid would tie), so the two forms would disagree on near ties.

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
# (replica id, in_flight, last_used as wall-clock seconds, free memory): one registry row.
CounterRow = tuple[str, int, float, int]
TICKS_PER_SECOND = 1_000_000


def used_tick(seconds: float) -> int:
    """A time on the microsecond grid on which last use is compared."""
    return round(seconds * TICKS_PER_SECOND)


def free_on_device(replica: ReplicaView, free_memory: Mapping[int | None, int]) -> int:
    return free_memory.get(replica.device, 0)


def sort_key(replica: ReplicaView, free_memory: Mapping[int | None, int]) -> SortKey:
    """Smaller is better; PICK_SQL orders `counter_row`s exactly the same way."""
    return (
        replica.in_flight,
        used_tick(replica.last_used),
        -free_on_device(replica, free_memory),
        replica.id,
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


def counter_row(
    replica: ReplicaView, free_memory: Mapping[int | None, int], wall_offset: float
) -> CounterRow:
    """The registry row of a replica's counters; `wall_offset` is wall minus monotonic.

    Integer ticks add exactly, and distinct ticks stay distinct seconds as doubles
    (until the year 2242), so the stored order is exactly the order of `sort_key`.
    """
    ticks = used_tick(replica.last_used) + used_tick(wall_offset)
    return (
        replica.id,
        replica.in_flight,
        ticks / TICKS_PER_SECOND,
        free_on_device(replica, free_memory),
    )
