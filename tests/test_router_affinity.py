"""The router with affinity keys, over test replicas (the production wiring)."""

from collections import Counter
from dataclasses import replace
from pathlib import Path

from modeld.policy.affinity import build_ring, successors
from modeld.spec import ModelSpec
from routing_fakes import router_harness

M = ModelSpec(name="m", backend="echo", max_replicas=4)


async def test_a_key_whose_replica_is_full_goes_to_one_with_room_and_starts_nothing(
    tmp_path: Path,
) -> None:
    spec = replace(M, parallel=2)
    async with router_harness(tmp_path, spec) as h:
        replicas = await h.router.load("m", 3, h.deadline())
        for _ in range(5):  # plain Routes: fewest leases first, so 2, 2 and 1
            await h.router.route("m", h.deadline())
        held = h.router.leases_by_replica()
        assert sorted(held.values()) == [1, 2, 2]
        ring = build_ring(r.id for r in replicas)
        key = next(k for k in (f"k{i}" for i in range(100)) if held[next(successors(ring, k))] == 2)
        lease = await h.router.route("m", h.deadline(), key)
        # Its own replica is at parallel: the key moves on to the one with room, and
        # with room left nothing scales out.
        assert held[lease.replica_id] == 1
        assert h.router.pool("m").pending() == 0


async def test_without_a_key_routing_is_unchanged_and_one_key_sticks(tmp_path: Path) -> None:
    async with router_harness(tmp_path, M) as h:
        await h.router.load("m", 3, h.deadline())
        plain = [await h.router.route("m", h.deadline()) for _ in range(6)]
        assert sorted(Counter(lease.replica_id for lease in plain).values()) == [2, 2, 2]
        for lease in plain:
            h.router.release(lease.id, "OK")
        keyed = []
        for _ in range(10):
            lease = await h.router.route("m", h.deadline(), "one-key")
            keyed.append(lease.replica_id)
            h.router.release(lease.id, "OK")
        assert len(set(keyed)) == 1
