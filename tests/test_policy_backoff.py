import pytest
from hypothesis import given
from hypothesis import strategies as st

from modeld.policy.backoff import (
    BackoffPolicy,
    BackoffState,
    StartDecision,
    after_crash,
    after_failure,
    after_ready,
    decide_start,
    next_backoff,
)

P = BackoffPolicy(base=1.0, cap=300.0, crash_loop_window=30.0)


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


def test_a_start_goes_at_once_waits_or_is_refused_by_its_deadline() -> None:
    state = BackoffState(2, not_before=104.0, reason="timeout")
    assert decide_start(None, 100.0, 100.0) == StartDecision(100.0)
    assert decide_start(state, 104.0, 104.0) == StartDecision(104.0)
    assert decide_start(state, 103.0, 110.0) == StartDecision(104.0)
    assert decide_start(state, 103.0, 104.0) == StartDecision(104.0)
    assert decide_start(state, 103.0, 103.9) == StartDecision(104.0, refused=state)


def test_a_crash_soon_after_ready_is_a_failure_and_a_later_one_is_not() -> None:
    failed = after_failure(None, 100.0, "exit 1", P)
    ready = after_ready(failed, 101.0, P)
    assert ready is not None
    assert ready.failures == 1
    loop = after_crash(ready, 101.5, 101.0, "SIGKILL", P)
    assert loop is not None
    assert (loop.failures, loop.not_before, loop.reason) == (2, 103.5, "SIGKILL")
    assert after_crash(None, 200.0, 150.0, "SIGKILL", P) is None
    assert after_crash(None, 200.0, None, "SIGKILL", P) is None


def test_a_success_is_forgotten_only_after_the_window() -> None:
    failed = after_failure(after_failure(None, 0.0, "a", P), 1.0, "b", P)
    ready = after_ready(failed, 3.0, P)
    assert after_failure(ready, 32.9, "c", P).failures == 3
    assert after_failure(ready, 33.0, "c", P).failures == 1
    assert decide_start(ready, 33.0, 33.0) == StartDecision(33.0)
    assert after_ready(None, 5.0, P) is None


@given(
    st.lists(
        st.tuples(st.sampled_from(["fail", "ready", "crash"]), st.floats(0.0, 0.5)),
        max_size=40,
    )
)
def test_inside_the_window_every_failure_counts_and_delays_never_shrink(
    steps: list[tuple[str, float]],
) -> None:
    """40 steps of at most 0.5 s stay inside the 30 s window: short successes reset
    nothing, every failed start and every crash after READY is one more failure."""
    state: BackoffState | None = None
    now, failures, last_delay = 0.0, 0, 0.0
    ready_at: float | None = None
    for kind, gap in steps:
        now += gap
        if kind == "ready":
            state, ready_at = after_ready(state, now, P), now
            continue
        if kind == "crash" and ready_at is None:
            continue
        if kind == "crash":
            state, ready_at = after_crash(state, now, ready_at, "crash", P), None
        else:
            state = after_failure(state, now, "fail", P)
        failures += 1
        assert state is not None
        assert state.failures == failures
        delay = state.not_before - now
        assert delay >= last_delay
        last_delay = delay
