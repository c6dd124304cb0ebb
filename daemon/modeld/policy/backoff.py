"""Per-model start backoff, so a model that cannot stay up cannot cause a retry storm.

Pure: every function takes `now` (monotonic seconds) and returns the new state.

- A start that fails is a failure.
- A READY replica that dies within `crash_loop_window` of becoming READY is a
  failure too (a crash loop: it loads, then dies on the first request, say).
- A READY replica that dies later is not: it is replaced on the next demand,
  at once.
- Failures are forgotten only once a start has stayed READY for the whole
  window, so one short-lived success does not reset the growing delay.
- A caller whose deadline reaches past the next attempt waits for it; only one
  whose deadline ends first is refused.
"""

from dataclasses import dataclass, replace

# 2**63 seconds is far beyond any cap; it keeps the power from growing without bound.
_MAX_EXPONENT = 63


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    base: float = 1.0
    cap: float = 300.0
    # A READY replica that dies sooner than this after becoming READY counts as a failed start.
    crash_loop_window: float = 30.0


DEFAULT = BackoffPolicy()


@dataclass(frozen=True, slots=True)
class BackoffState:
    failures: int
    not_before: float
    reason: str
    # A start succeeded: the failures are forgotten at this time unless another comes first.
    forget_at: float | None = None


def next_backoff(failures: int, base: float = 1.0, cap: float = 300.0) -> float:
    """Seconds to wait after the given number of consecutive failures: base, 2*base, ... cap."""
    if failures <= 0:
        return 0.0
    exponent = min(failures - 1, _MAX_EXPONENT)
    return float(min(base * 2.0**exponent, cap))


def current(state: BackoffState | None, now: float) -> BackoffState | None:
    """The state, or None once a successful start has outlived the crash-loop window."""
    if state is not None and state.forget_at is not None and now >= state.forget_at:
        return None
    return state


def after_failure(
    state: BackoffState | None, now: float, reason: str, policy: BackoffPolicy = DEFAULT
) -> BackoffState:
    """A start failed (or a replica died inside the crash-loop window)."""
    prior = current(state, now)
    failures = (prior.failures if prior else 0) + 1
    return BackoffState(failures, now + next_backoff(failures, policy.base, policy.cap), reason)


def after_ready(
    state: BackoffState | None, now: float, policy: BackoffPolicy = DEFAULT
) -> BackoffState | None:
    """A start succeeded: keep counting until it has stayed up for the window."""
    prior = current(state, now)
    if prior is None:
        return None
    return replace(prior, forget_at=now + policy.crash_loop_window)


def is_crash_loop(ready_since: float | None, now: float, policy: BackoffPolicy = DEFAULT) -> bool:
    """Whether a READY replica that died at `now` died too soon after becoming READY."""
    return ready_since is not None and now - ready_since < policy.crash_loop_window


def after_crash(
    state: BackoffState | None,
    now: float,
    ready_since: float | None,
    reason: str,
    policy: BackoffPolicy = DEFAULT,
) -> BackoffState | None:
    """A READY replica died: a failure inside the crash-loop window, else no backoff at all."""
    if is_crash_loop(ready_since, now, policy):
        return after_failure(state, now, reason, policy)
    return current(state, now)


@dataclass(frozen=True, slots=True)
class StartDecision:
    """When a start asked for at `now` may begin: `at` (<= now: at once), or refused."""

    at: float
    refused: BackoffState | None = None


def decide_start(state: BackoffState | None, now: float, deadline: float) -> StartDecision:
    """Start now, wait until `not_before` when the deadline reaches past it, or refuse."""
    active = current(state, now)
    if active is None or now >= active.not_before:
        return StartDecision(now)
    if deadline < active.not_before:
        return StartDecision(active.not_before, refused=active)
    return StartDecision(active.not_before)
