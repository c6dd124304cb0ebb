"""Consistent hashing with bounded loads (policy/affinity.py), as pure functions."""

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from modeld.policy.affinity import DEFAULT_SLACK, bound, build_ring, pick_affine, successors

REPLICAS = ("r-alpha", "r-beta", "r-gamma")
KEYS = [f"session-{i}" for i in range(300)]


def idle(ids: tuple[str, ...] = REPLICAS) -> dict[str, int]:
    return dict.fromkeys(ids, 0)


def test_one_key_always_goes_to_one_replica() -> None:
    ring = build_ring(REPLICAS)
    chosen = {pick_affine(ring, "conversation-7", idle(), DEFAULT_SLACK) for _ in range(30)}
    assert len(chosen) == 1 and chosen <= set(REPLICAS)


def test_the_ring_is_the_same_whatever_order_it_was_built_in() -> None:
    a, b = build_ring(REPLICAS), build_ring(reversed(REPLICAS))
    assert a == b
    assert [pick_affine(a, k, idle(), 1.25) for k in KEYS] == [
        pick_affine(b, k, idle(), 1.25) for k in KEYS
    ]


def test_300_keys_spread_with_every_replica_at_least_a_fifth() -> None:
    ring = build_ring(REPLICAS)
    spread = Counter(pick_affine(ring, k, idle(), DEFAULT_SLACK) for k in KEYS)
    assert set(spread) == set(REPLICAS)
    assert min(spread.values()) >= 0.2 * len(KEYS), spread


@settings(max_examples=25, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), min_size=3, max_size=3, unique=True))
def test_any_three_ids_spread_300_keys_at_least_a_fifth_each(ids: list[str]) -> None:
    ring = build_ring(ids)
    spread = Counter(pick_affine(ring, k, idle(tuple(ids)), DEFAULT_SLACK) for k in KEYS)
    assert min(spread.get(i, 0) for i in ids) >= 60, spread


def test_six_leases_of_one_key_held_at_once_put_at_most_three_on_a_replica() -> None:
    ring = build_ring(REPLICAS)
    held = idle()
    for _ in range(6):
        chosen = pick_affine(ring, "one-key", held, DEFAULT_SLACK)
        assert chosen is not None
        held[chosen] += 1
    assert sum(held.values()) == 6
    assert max(held.values()) <= 3, held
    # The key's own replica took as many as the bound let it.
    first = next(successors(ring, "one-key"))
    assert held[first] == 3


def test_removing_a_replica_moves_only_its_own_keys() -> None:
    before = build_ring(REPLICAS)
    after = build_ring(REPLICAS[:2])
    old = {k: pick_affine(before, k, idle(), DEFAULT_SLACK) for k in KEYS}
    new = {k: pick_affine(after, k, idle(REPLICAS[:2]), DEFAULT_SLACK) for k in KEYS}
    moved = [k for k in KEYS if old[k] != new[k]]
    assert all(old[k] == REPLICAS[2] for k in moved)
    assert len(moved) <= 0.45 * len(KEYS)


def test_adding_a_replica_moves_keys_only_onto_it() -> None:
    before = build_ring(REPLICAS)
    after = build_ring((*REPLICAS, "r-delta"))
    grown = idle((*REPLICAS, "r-delta"))
    moved = [
        k
        for k in KEYS
        if pick_affine(before, k, idle(), DEFAULT_SLACK) != pick_affine(after, k, grown, 1.25)
    ]
    assert moved and all(pick_affine(after, k, grown, 1.25) == "r-delta" for k in moved)
    assert len(moved) <= 0.4 * len(KEYS)


def test_a_full_successor_passes_the_key_on_clockwise() -> None:
    ring = build_ring(REPLICAS)
    order = list(successors(ring, "k"))
    assert sorted(order) == sorted(REPLICAS)
    held = {order[0]: 5, order[1]: 0, order[2]: 0}
    assert pick_affine(ring, "k", held, DEFAULT_SLACK) == order[1]


def test_candidates_off_the_ring_or_missing_are_skipped() -> None:
    ring = build_ring(REPLICAS)
    order = list(successors(ring, "k"))
    assert pick_affine(ring, "k", {order[1]: 0, "new": 0}, 1.25) == order[1]
    assert pick_affine(ring, "k", {"new": 0}, 1.25) is None
    assert pick_affine(ring, "k", {}, 1.25) is None
    assert list(successors(build_ring(()), "k")) == []


@given(
    st.lists(st.integers(0, 20), min_size=1, max_size=6),
    st.floats(1.0, 3.0),
    st.text(max_size=8),
)
def test_with_slack_at_least_one_someone_is_always_under_the_bound(
    loads: list[int], slack: float, key: str
) -> None:
    ids = [f"r{i}" for i in range(len(loads))]
    held = dict(zip(ids, loads, strict=True))
    chosen = pick_affine(build_ring(ids, vnodes=8), key, held, slack)
    assert chosen is not None
    assert held[chosen] < bound(sum(loads), len(loads), slack)
