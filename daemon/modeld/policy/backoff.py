"""Per-model failure backoff, so a model that fails to load cannot cause a retry storm.

A success resets the backoff: the caller simply drops the state.
"""

from dataclasses import dataclass

# 2**63 seconds is far beyond any cap; it keeps the power from growing without bound.
_MAX_EXPONENT = 63


@dataclass(frozen=True, slots=True)
class BackoffState:
    failures: int
    not_before: float
    reason: str


def next_backoff(failures: int, base: float = 1.0, cap: float = 300.0) -> float:
    """Seconds to wait after the given number of consecutive failures: base, 2*base, ... cap."""
    if failures <= 0:
        return 0.0
    exponent = min(failures - 1, _MAX_EXPONENT)
    return float(min(base * 2.0**exponent, cap))


def after_failure(
    state: BackoffState | None,
    now: float,
    reason: str,
    base: float = 1.0,
    cap: float = 300.0,
) -> BackoffState:
    failures = (state.failures if state else 0) + 1
    return BackoffState(failures, now + next_backoff(failures, base, cap), reason)


def check(state: BackoffState | None, now: float) -> BackoffState | None:
    """The state when a start must still be refused at `now`, else None."""
    if state is not None and now < state.not_before:
        return state
    return None
