import pytest

from modeld.policy.backoff import BackoffState, after_failure, check, next_backoff


@pytest.mark.parametrize(
    ("failures", "expected"), [(0, 0.0), (1, 1.0), (2, 2.0), (3, 4.0), (9, 256.0), (10, 300.0)]
)
def test_next_backoff_doubles_up_to_the_cap(failures: int, expected: float) -> None:
    assert next_backoff(failures) == expected


def test_next_backoff_survives_huge_failure_counts() -> None:
    assert next_backoff(10_000, base=0.5, cap=60.0) == 60.0


def test_failures_accumulate_and_push_not_before_out() -> None:
    first = after_failure(None, now=100.0, reason="exit 1")
    assert first == BackoffState(1, 101.0, "exit 1")
    second = after_failure(first, now=102.0, reason="timeout")
    assert second == BackoffState(2, 104.0, "timeout")


def test_check_refuses_only_before_not_before() -> None:
    state = BackoffState(2, not_before=104.0, reason="timeout")
    assert check(state, 103.9) == state
    assert check(state, 104.0) is None
    assert check(None, 0.0) is None
