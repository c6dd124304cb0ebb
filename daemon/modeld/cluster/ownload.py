"""This host's own share of remote replicas' in-flight, not yet in their published rows.

Owners publish load at most once a second, so a forwarder that picked only by
published figures would send a whole burst to one replica. It adds what it knows
itself: forwards still in flight, the owner's own figure that came back with its
last answer to a forwarded Route, and leases released through this host since.
A new row resets that correction, since the owner's figure then includes them.
"""

from collections import Counter, OrderedDict
from collections.abc import Iterable

from modeld.cluster.view import RemoteReplica

# Forwarded leases remembered for their Release; older ones are forgotten first.
MAX_TRACKED_LEASES = 100_000


class OwnLoad:
    def __init__(self) -> None:
        self._pending: Counter[str] = Counter()
        # replica id → (the row a correction is relative to, the correction to its in-flight)
        self._since: dict[str, tuple[RemoteReplica, int]] = {}
        self._leases: OrderedDict[str, RemoteReplica] = OrderedDict()

    def extra(self, replicas: Iterable[RemoteReplica]) -> dict[str, int]:
        out = {}
        for r in replicas:
            row, count = self._since.get(r.id, (r, 0))
            out[r.id] = self._pending[r.id] + (count if row is r else 0)
        return out

    def begin(self, replica: RemoteReplica) -> None:
        self._pending[replica.id] += 1

    def end(self, replica: RemoteReplica) -> None:
        self._pending[replica.id] -= 1
        if self._pending[replica.id] <= 0:
            del self._pending[replica.id]

    def granted(self, row: RemoteReplica | None, lease_id: str) -> None:
        """A forwarded Route got `lease_id` on the replica whose current row is `row`
        (counted by the `observed` figure that came with it; remembered for Release)."""
        if row is None:
            return
        self._leases[lease_id] = row
        if len(self._leases) > MAX_TRACKED_LEASES:
            self._leases.popitem(last=False)

    def observed(self, row: RemoteReplica | None, in_flight: int) -> None:
        """The owner answered a forwarded Route with the replica's in-flight: exact
        for now, so it replaces the estimate until the next row."""
        if row is not None:
            self._since[row.id] = (row, in_flight - row.in_flight)

    def row_of(self, lease_id: str) -> RemoteReplica | None:
        return self._leases.get(lease_id)

    def released(self, lease_id: str, current: RemoteReplica | None) -> None:
        row = self._leases.pop(lease_id, None)
        if row is not None and current is not None:
            self._shift(current, -1)

    def _shift(self, row: RemoteReplica, by: int) -> None:
        seen, count = self._since.get(row.id, (row, 0))
        self._since[row.id] = (row, (count if seen is row else 0) + by)
