"""Per-replica lease slots (`parallel`) and when a model needs one more replica.

Pure: the counts come in, a decision goes out. A replica with `parallel = N` holds
at most N leases (its backend runs N requests at once; more would queue inside it,
where nobody can see them). When every READY replica is full and Routes wait, one
more replica starts, one at a time: a start in progress is the answer to the
shortage that caused it, so a burst never causes a storm of starts.
"""

from collections.abc import Sequence


def has_room(in_flight: int, parallel: int) -> bool:
    """Whether a replica holding `in_flight` leases may take one more (0 = unlimited)."""
    return parallel <= 0 or in_flight < parallel


def scale_out(
    *,
    ready_in_flight: Sequence[int],
    parallel: int,
    waiting: int,
    starting: int,
    planned: int,
    max_replicas: int,
) -> bool:
    """One more replica: Routes wait, every READY replica is at `parallel`, no start is
    in progress, and max_replicas (which counts starts in progress) allows it."""
    if parallel <= 0 or waiting <= 0 or starting > 0 or planned >= max_replicas:
        return False
    return not any(has_room(n, parallel) for n in ready_in_flight)
