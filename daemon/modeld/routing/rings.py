"""Affinity rings per model, built again only when the set of replicas changes.

A Route with an affinity key needs the ring of its candidates; building one hashes
`VNODES` points per replica, so it is kept until the set of replica ids differs
(a replica became READY or left), and a Route only compares ids (O(replicas)).
Owned by one router (the local one, or the cluster router for remote candidates).
"""

from collections.abc import Collection

from modeld.policy.affinity import Ring, build_ring


class Rings:
    def __init__(self) -> None:
        self._rings: dict[str, Ring] = {}

    def ring(self, model: str, ids: Collection[str]) -> Ring:
        ring = self._rings.get(model)
        if ring is None or len(ring.members) != len(ids) or any(i not in ring.members for i in ids):
            ring = self._rings[model] = build_ring(ids)
        return ring
