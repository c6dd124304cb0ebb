"""The claim decision (claims.decide), the claim marker of a forwarded Load, and the
phases of a start (coldphase.py)."""

import pytest
import structlog

from modeld.cluster.claims import (
    FAILED,
    LOADING,
    SERVING,
    Claim,
    Failed,
    Full,
    Slot,
    Wait,
    claim_of,
    decide,
)
from modeld.cluster.coldphase import ALLOWED, BadEdge, Start
from modeld.cluster.coldphase import Phase as P
from modeld.cluster.marker import PLAIN, parse


def loading(slot: int, live: bool = True, owner: str = "a") -> Slot:
    return Slot(slot, 10 + slot, owner, LOADING, live)


def serving(slot: int, replica_state: str | None = "READY") -> Slot:
    return Slot(slot, 10 + slot, "a", SERVING, False, replica_state)


def test_no_claim_takes_slot_0() -> None:
    assert decide("m", [], 1, cold=True) == Claim("m", 0, 0, False)
    assert decide("m", [], 3, cold=False) == Claim("m", 0, 0, False)


def test_a_cold_start_waits_for_one_loading_anywhere() -> None:
    # Even with free slots: a cold model starts once, not once per slot.
    assert decide("m", [loading(0, owner="b")], 3, cold=True) == Wait("host b is starting it")
    assert decide("m", [loading(1)], 3, cold=True) == Wait("host a is starting it")


def test_a_cold_start_waits_for_a_just_published_ready_replica() -> None:
    assert isinstance(decide("m", [serving(0)], 3, cold=True), Wait)


def test_a_load_takes_the_next_free_slot() -> None:
    assert decide("m", [loading(0), serving(1)], 3, cold=False) == Claim("m", 2, 0, False)


def test_an_expired_loading_claim_is_taken_over() -> None:
    assert decide("m", [loading(0, live=False)], 1, cold=True) == Claim("m", 0, 0, True)


def test_a_serving_slot_whose_replica_row_is_gone_is_free() -> None:
    assert decide("m", [serving(0, None)], 1, cold=True) == Claim("m", 0, 0, False)


def test_a_draining_replica_still_holds_its_slot() -> None:
    slots = [serving(0, "DRAINING")]
    assert decide("m", slots, 2, cold=True) == Claim("m", 1, 0, False)
    assert decide("m", slots, 1, cold=False) == Full((slots[0],))
    assert isinstance(decide("m", slots, 1, cold=True), Wait)


def test_max_replicas_counts_every_slot_held() -> None:
    slots = [loading(0), serving(1)]
    assert decide("m", slots, 2, cold=False) == Full(tuple(slots))


def test_failure_backoff_fails_every_start_until_it_ends() -> None:
    failed = Slot(0, 1, "a", FAILED, True, None, "boom", "Unavailable")
    assert decide("m", [failed], 3, cold=True) == Failed("boom", "Unavailable")
    assert decide("m", [failed], 3, cold=False) == Failed("boom", "Unavailable")
    over = Slot(0, 1, "a", FAILED, False, None, "boom", "Unavailable")
    assert decide("m", [over], 1, cold=True) == Claim("m", 0, 0, False)


def test_slots_above_a_lowered_max_replicas_are_ignored() -> None:
    assert decide("m", [serving(2, "DRAINING")], 1, cold=False) == Claim("m", 0, 0, False)


def test_claim_marker_round_trips() -> None:
    claim = Claim("m", 2, 12345)
    assert claim_of("m", parse(claim.marker)) == claim
    assert claim_of("m", None) is None
    for marker in (PLAIN, "v=1;slot=1", "v=1;slot=x;claim=1", "claim:1:2"):
        assert claim_of("m", parse(marker)) is None


def test_a_start_moves_only_along_its_edges_and_says_each_move_once() -> None:
    start = Start("m", "cold")
    with structlog.testing.capture_logs() as logs:
        for phase in (P.PLACING, P.LOADING, P.PLACING, P.LOADING, P.SEEING, P.SEEING, P.READY):
            start.to(phase)
    moves = [(e["from_phase"], e["to_phase"]) for e in logs if e["event"] == "cluster_start_phase"]
    assert moves == [
        ("claiming", "placing"),
        ("placing", "loading"),
        ("loading", "placing"),
        ("placing", "loading"),
        ("loading", "seeing"),
        ("seeing", "ready"),
    ]
    with pytest.raises(BadEdge, match="ready -> claiming"):
        start.to(P.CLAIMING)
    with pytest.raises(BadEdge, match="claiming -> seeing"):
        Start("m", "cold").to(P.SEEING)


def test_every_phase_but_the_two_ends_can_fail_and_the_ends_are_final() -> None:
    assert {p for p, edges in ALLOWED.items() if P.FAILED in edges} == set(P) - {P.READY, P.FAILED}
    assert ALLOWED[P.READY] == ALLOWED[P.FAILED] == frozenset()
