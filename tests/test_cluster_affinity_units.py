"""Affinity over a cluster's candidates (`cluster_route.affine_target`), without daemons."""

from collections import Counter

from modeld.info import RemoteReplica
from modeld.policy.affinity import build_ring, successors
from modeld.policy.cluster_route import affine_target
from modeld.routing.rings import Rings
from modeld.state import ReplicaState

KEYS = [f"k{i}" for i in range(300)]


def remote(rid: str, in_flight: int = 0) -> RemoteReplica:
    return RemoteReplica(rid, f"host-{rid}", 1, "m", ReplicaState.READY, "x:1", 0, in_flight,
                         100.0, 0)  # fmt: skip


def test_a_key_goes_to_its_replica_whether_it_is_local_or_remote() -> None:
    local = {"here": 0}
    others = [remote("r1"), remote("r2")]
    ring = build_ring(["here", "r1", "r2"])
    where = Counter()
    for key in KEYS:
        home = next(successors(ring, key))
        chosen = affine_target(ring, key, local=local, candidates=others, extra={}, slack=1.25)
        assert (chosen.id if chosen else "here") == home
        where[home] += 1
    assert min(where.values()) >= 60, where


def test_the_bound_counts_estimated_remote_load_and_local_in_flight() -> None:
    ring = build_ring(["here", "r1", "r2"])
    local_home = next(k for k in KEYS if next(successors(ring, k)) == "here")
    _, second, _ = successors(ring, local_home)
    chosen = affine_target(
        ring,
        local_home,
        local={"here": 3},
        candidates=[remote("r1"), remote("r2")],
        extra={},
        slack=1.25,
    )
    assert chosen is not None and chosen.id == second
    # A remote home: its published in-flight plus what this host added since (OwnLoad.extra).
    key = next(k for k in KEYS if next(successors(ring, k)) == "r1")
    _, after_r1, _ = successors(ring, key)
    for published, extra in ((3, 0), (0, 3), (1, 2)):
        chosen = affine_target(
            ring,
            key,
            local={"here": 0},
            candidates=[remote("r1", published), remote("r2")],
            extra={"r1": extra},
            slack=1.25,
        )
        assert (chosen.id if chosen else "here") == after_r1
    chosen = affine_target(
        ring,
        key,
        local={"here": 0},
        candidates=[remote("r1"), remote("r2")],
        extra={},
        slack=1.25,
    )
    assert chosen is not None and chosen.id == "r1"


def test_rings_are_built_again_only_when_the_ids_change() -> None:
    rings = Rings()
    first = rings.ring("m", ["a", "b"])
    assert rings.ring("m", ["b", "a"]) is first
    assert rings.ring("m", ["a", "b", "c"]) is not first
    assert rings.ring("m", ["a", "c"]).members == frozenset({"a", "c"})
    assert rings.ring("other", ["a", "c"]) is not rings.ring("m", ["a", "b"])
