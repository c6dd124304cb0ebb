"""The crash-loop backoff tracker on its own: a fake clock, no pool, no replicas."""

import pytest
import structlog

from modeld.clock import FakeClock
from modeld.errors import Unavailable
from modeld.policy.backoff import BackoffPolicy
from modeld.routing.start_backoff import BackoffTracker
from modeld.spec import ModelSpec

SPEC = ModelSpec(name="m", backend="echo")
SHORT = BackoffPolicy(crash_loop_window=5.0)


def tracker(clock: FakeClock, policy: BackoffPolicy | None = None) -> BackoffTracker:
    t = BackoffTracker("m", clock, (lambda _: policy) if policy else (lambda _: BackoffPolicy()))
    t.starting(SPEC)
    return t


def test_a_failed_start_refuses_callers_whose_deadline_ends_first() -> None:
    clock = FakeClock()
    t = tracker(clock)
    assert t.check() == clock.monotonic()
    t.failed("exit code 7")
    with pytest.raises(Unavailable, match=r"after 1 failure\(s\).*in 1\.0s.*exit code 7"):
        t.check()
    assert t.check(deadline=clock.monotonic() + 1.0) == clock.monotonic() + 1.0
    clock.advance(1.0)
    assert t.check() == clock.monotonic()


def test_a_crash_soon_after_ready_is_a_crash_loop_and_names_the_time() -> None:
    clock = FakeClock()
    t = tracker(clock, SHORT)
    t.ready("r1")
    assert t.ready_since("r1") == clock.monotonic()
    clock.advance(2.0)
    with structlog.testing.capture_logs() as logs:
        t.crashed("r1", "SIGSEGV")
    assert t.state is not None and t.state.failures == 1
    assert "replica r1 died 2.0s after READY: SIGSEGV" in t.state.reason
    assert [e["event"] for e in logs] == ["model_backing_off"]
    assert t.ready_since("r1") is None


def test_a_crash_after_the_window_is_replaced_on_demand() -> None:
    clock = FakeClock()
    t = tracker(clock, SHORT)
    t.ready("r1")
    clock.advance(5.0)
    with structlog.testing.capture_logs() as logs:
        t.crashed("r1", "SIGKILL")
    assert t.state is None
    assert [e["event"] for e in logs] == ["replica_crash_replaced_on_demand"]
    assert t.check() == clock.monotonic()


def test_the_window_is_the_latest_starts_backend_policy() -> None:
    clock = FakeClock()
    t = tracker(clock)  # default window: 30 s
    t.ready("r1")
    clock.advance(10.0)
    t.crashed("r1", "boom")
    assert t.state is not None, "10 s is inside the default 30 s window"
    short = BackoffTracker("m", clock, lambda _: SHORT)
    short.starting(SPEC)
    short.ready("r2")
    clock.advance(10.0)
    short.crashed("r2", "boom")
    assert short.state is None, "10 s is past this backend's 5 s window"


def test_ready_times_of_replicas_the_pool_forgot_are_dropped() -> None:
    clock = FakeClock()
    t = tracker(clock, SHORT)
    t.ready("kept")
    t.ready("gone")
    t.keep(["kept"])
    assert (t.ready_since("kept"), t.ready_since("gone")) == (clock.monotonic(), None)
    t.crashed("gone", "late event")
    assert t.state is None, "a crash nobody timed is not a crash loop"


def test_a_short_success_does_not_reset_the_failures() -> None:
    clock = FakeClock()
    t = tracker(clock, SHORT)
    t.failed("one")
    clock.advance(1.0)
    t.ready("r1")
    clock.advance(1.0)
    t.failed("two")
    assert t.state is not None and t.state.failures == 2
    clock.advance(2.0)
    t.ready("r2")
    clock.advance(5.0)
    assert t.check() == clock.monotonic()
    t.failed("three")
    assert t.state is not None and t.state.failures == 1
