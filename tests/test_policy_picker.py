from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from modeld.policy.picker import pick_replica, sort_key
from modeld.policy.view import ReplicaView
from modeld.state import ReplicaState

GIB = 1 << 30


def rv(id: str, **kw: object) -> ReplicaView:
    base = ReplicaView(
        id=id,
        model="m",
        state=ReplicaState.READY,
        in_flight=0,
        last_used=100.0,
        idle_since=100.0,
        oldest_lease_started=None,
        gpu_ids=(0,),
        memory=GIB,
        pinned=False,
        groups=(),
        idle_ttl=None,
        busy_timeout=None,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


FREE = {0: 10 * GIB, 1: 20 * GIB, None: 5 * GIB}


def test_fewest_in_flight_wins_over_everything_else() -> None:
    busy = rv("a", in_flight=1, last_used=0.0, gpu_ids=(1,))
    calm = rv("b", in_flight=0, last_used=500.0, gpu_ids=(0,))
    assert pick_replica([busy, calm], FREE) == calm


def test_oldest_last_used_breaks_in_flight_tie() -> None:
    recent = rv("a", last_used=200.0, gpu_ids=(1,))
    older = rv("b", last_used=150.0, gpu_ids=(0,))
    assert pick_replica([recent, older], FREE) == older


def test_most_free_memory_breaks_last_used_tie() -> None:
    on_small = rv("a", gpu_ids=(0,))
    on_big = rv("b", gpu_ids=(1,))
    on_host = rv("c", gpu_ids=())
    assert pick_replica([on_small, on_big, on_host], FREE) == on_big
    assert pick_replica([on_small, on_host], FREE) == on_small


def test_first_gpu_decides_and_unknown_device_counts_as_no_free_memory() -> None:
    split = rv("a", gpu_ids=(0, 1))
    unknown = rv("b", gpu_ids=(7,))
    assert sort_key(split, FREE)[2] == -10 * GIB
    assert pick_replica([unknown, split], FREE) == split


def test_id_is_the_final_tie_break() -> None:
    assert pick_replica([rv("b"), rv("a"), rv("c")], FREE) == rv("a")


def test_only_ready_replicas_are_picked() -> None:
    loading = rv("a", state=ReplicaState.LOADING, in_flight=0, last_used=0.0)
    draining = rv("b", state=ReplicaState.DRAINING)
    assert pick_replica([loading, draining], FREE) is None
    ready = rv("c", in_flight=3)
    assert pick_replica([loading, draining, ready], FREE) == ready
    assert pick_replica([], FREE) is None


states = st.sampled_from(list(ReplicaState))
replica_lists = st.lists(
    st.builds(
        rv,
        id=st.text("abcdef", min_size=1, max_size=3),
        state=states,
        in_flight=st.integers(0, 3),
        last_used=st.sampled_from([0.0, 1.0, 2.0]),
        gpu_ids=st.sampled_from([(), (0,), (1,), (1, 0)]),
    ),
    max_size=8,
)


@given(replica_lists)
def test_pick_is_the_minimum_ready_replica_under_the_documented_order(
    replicas: list[ReplicaView],
) -> None:
    picked = pick_replica(replicas, FREE)
    ready = [r for r in replicas if r.state is ReplicaState.READY]
    if not ready:
        assert picked is None
        return
    assert picked is not None
    assert picked.state is ReplicaState.READY
    for other in ready:
        assert (picked.in_flight, picked.last_used, -FREE[picked.device], picked.id) <= (
            other.in_flight,
            other.last_used,
            -FREE[other.device],
            other.id,
        )
