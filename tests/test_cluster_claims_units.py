"""The claim decision (claims.decide) and the claim marker of a forwarded Load."""

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
    assert claim_of("m", claim.marker) == claim
    for marker in (None, "1", "claim:", "claim:x:1", "claim:1:", "other:1:2"):
        assert claim_of("m", marker) is None
