"""Where a Route goes in a cluster: a replica here, or another host's (pure).

Remote replicas are candidates like local ones, ranked by the picker's own order
(`picker.rank`) over the figures their hosts publish, with their in-flight estimated
from what this host has added since (`estimate`). The spill rule keeps a Route on a
local replica unless a remote one is less loaded; an affinity key goes where the
bounded-load ring over both puts it.
"""

from collections.abc import Iterable, Mapping

from modeld.info import RemoteReplica
from modeld.policy.affinity import Ring, pick_affine
from modeld.policy.picker import rank

# How many more in-flight the local replica may have than the best remote estimate
# before a Route spills over. 0: a tie stays here (no hop), and each decision keeps
# max - min within 1 as far as this host can tell; estimates lag by up to a publish
# interval, which is what the balance property's bound of 2 leaves room for.
SPILL_MARGIN = 0


def estimate(replica: RemoteReplica, extra: Mapping[str, int]) -> int:
    """A remote replica's in-flight: as published, plus what this host knows it added
    since (`OwnLoad.extra`); never below 0, since the two are read at different times."""
    return max(0, replica.in_flight + extra.get(replica.id, 0))


def pick_remote(
    candidates: Iterable[RemoteReplica], extra: Mapping[str, int]
) -> RemoteReplica | None:
    """The picker's order (`picker.rank`) over published figures, in-flight estimated."""
    return min(
        candidates,
        key=lambda r: rank(estimate(r, extra), r.last_used, r.free_memory, r.id),
        default=None,
    )


def route_target(
    local_in_flight: int | None,
    candidates: Iterable[RemoteReplica],
    extra: Mapping[str, int],
    margin: int = SPILL_MARGIN,
) -> RemoteReplica | None:
    """Where a Route goes: None = here, else the remote replica to forward to.

    `local_in_flight` is the least-loaded local READY replica's in-flight (None: no
    local READY replica, so the best remote, or None to start one here). A local
    replica is kept unless it has more than `margin` in-flight over the best remote's
    estimate: load spread unevenly over the modelds still spreads evenly over replicas.
    """
    best = pick_remote(candidates, extra)
    if best is None or local_in_flight is None:
        return best
    return best if local_in_flight > estimate(best, extra) + margin else None


def affine_target(
    ring: Ring,
    key: str,
    *,
    local: Mapping[str, int],
    candidates: Iterable[RemoteReplica],
    extra: Mapping[str, int],
    slack: float,
) -> RemoteReplica | None:
    """Where a Route with an affinity key goes: the picker's bounded-load ring over
    local replicas (id -> in-flight) and remote ones (estimated) together; None = here
    (the key's replica is local, or no replica is on the ring)."""
    remote = {r.id: r for r in candidates}
    loads = {**local, **{i: estimate(r, extra) for i, r in remote.items()}}
    chosen = pick_affine(ring, key, loads, slack)
    return remote.get(chosen) if chosen is not None else None
