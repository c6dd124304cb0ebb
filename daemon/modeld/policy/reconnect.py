"""When to try the cluster database again after a failed connect (pure).

Full jitter: the n-th retry waits a uniform fraction of min(cap, base * 2**(n-1)).
When the database comes back to a hundred hosts at once, their connects spread
over the whole window instead of arriving together (no reconnect storm), and one
host never tries more often than the doubling allows.
"""

from modeld.policy.backoff import next_backoff

BASE_S = 0.25
CAP_S = 5.0


def reconnect_delay(
    failures: int, fraction: float, base: float = BASE_S, cap: float = CAP_S
) -> float:
    """Seconds before the next connect after `failures` failed ones in a row; `fraction`
    is a random number in [0, 1) from the caller. The floor of a tenth of the window
    keeps a host that draws near-zero from spinning."""
    window = next_backoff(failures, base, cap)
    return window * (0.1 + 0.9 * min(max(fraction, 0.0), 1.0))


def attempts_bound(seconds: float, base: float = BASE_S, cap: float = CAP_S) -> int:
    """The most connects one host can make in `seconds` of outage: the shortest delays
    every time (a tenth of each window), plus the first attempt."""
    attempts, spent = 1, 0.0
    while True:
        spent += reconnect_delay(attempts, 0.0, base, cap)
        if spent > seconds:
            return attempts
        attempts += 1
