"""This host's own share of remote replicas' in-flight, not yet in their published rows.

Owners publish load at most once a second, so a forwarder that picked only by
published figures would send a whole burst to one replica. It adds what it knows
itself: forwards still in flight, and leases it obtained (minus those released
through it) since the replica's row was last read. Each answer to a forwarded
Route also carries the owner's own figure, which counts everyone's leases (the
owner's local ones, other forwarders'): it is a floor under the estimate, never
added to it, since answers to concurrent forwards arrive in any order and may
count forwards still pending here. A new row (new figures, not a re-read of the
same ones) starts both again, keeping only those of our leases it may lack: it was
written before it reached us, so leases granted meanwhile are not in it, at most as
many as the owner's last answered figure exceeds it by.
"""

from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace

from modeld.info import RemoteReplica

# Forwarded leases remembered for their Release; older ones are forgotten first.
MAX_TRACKED_LEASES = 100_000


@dataclass(frozen=True, slots=True)
class _Since:
    """Corrections to one row's in-flight: ours (leases granted minus released since
    the row), and the owner's last answered figure minus our releases since (None
    before any answer)."""

    row: RemoteReplica
    ours: int = 0
    floor: int | None = None

    def granted(self) -> "_Since":
        # The floor is an answered figure: whether it counts this lease is unknown.
        return _Since(self.row, self.ours + 1, self.floor)

    def released(self) -> "_Since":
        return _Since(self.row, self.ours - 1, None if self.floor is None else self.floor - 1)

    def rebased(self, row: RemoteReplica) -> "_Since":
        """Ours carried over to `row`, which replaced `self.row`."""
        if self.floor is None:
            return _Since(row)
        lacking = self.floor + self.row.in_flight - row.in_flight
        return _Since(row, max(0, min(self.ours, lacking)))


class OwnLoad:
    def __init__(self) -> None:
        self._pending: Counter[str] = Counter()
        self._since: dict[str, _Since] = {}
        self._leases: OrderedDict[str, RemoteReplica] = OrderedDict()

    def extra(self, replicas: Iterable[RemoteReplica]) -> dict[str, int]:
        out = {}
        for r in replicas:
            since = self._current(r)
            counted = self._pending[r.id] + since.ours
            out[r.id] = counted if since.floor is None else max(counted, since.floor)
        return out

    def begin(self, replica: RemoteReplica) -> None:
        self._pending[replica.id] += 1

    def end(self, replica: RemoteReplica) -> None:
        self._pending[replica.id] -= 1
        if self._pending[replica.id] <= 0:
            del self._pending[replica.id]

    def granted(self, row: RemoteReplica | None, lease_id: str) -> None:
        """A forwarded Route got `lease_id` on the replica whose current row is `row`."""
        if row is None:
            return
        self._since[row.id] = self._current(row).granted()
        self._leases[lease_id] = row
        if len(self._leases) > MAX_TRACKED_LEASES:
            self._leases.popitem(last=False)

    def observed(self, row: RemoteReplica | None, in_flight: int) -> None:
        """The owner answered a forwarded Route with the replica's in-flight then."""
        if row is None:
            return
        since = self._current(row)
        floor = in_flight - row.in_flight
        if since.floor is not None:
            floor = max(floor, since.floor)
        self._since[row.id] = _Since(row, since.ours, floor)

    def row_of(self, lease_id: str) -> RemoteReplica | None:
        return self._leases.get(lease_id)

    def released(self, lease_id: str, current: RemoteReplica | None) -> None:
        row = self._leases.pop(lease_id, None)
        if row is not None and current is not None:
            self._since[current.id] = self._current(current).released()

    def _current(self, row: RemoteReplica) -> _Since:
        since = self._since.get(row.id)
        if since is None:
            return _Since(row)
        if since.row is not row:
            # A re-read of the same figures (another change was notified) is no news.
            fresh = since.rebased(row) if since.row != row else replace(since, row=row)
            since = self._since[row.id] = fresh
        return since
