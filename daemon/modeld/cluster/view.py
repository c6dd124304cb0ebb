"""The in-memory view of the cluster: hosts and their replicas, as last read.

Owned by the membership (the only writer: full resyncs and per-host re-reads);
the cluster router only reads it, and hears through `on_leave` when a host it may
hold a channel to has left the view. Host expiry is kept as a local monotonic
deadline computed from the database's own `lease_expires_at - now()`, so clocks
of different hosts never need to agree.
"""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from modeld.info import RemoteReplica
from modeld.state import ReplicaState


@dataclass(frozen=True, slots=True)
class HostFigures:
    """One host's published capacity; the columns its host row adds (cluster/schema.py):
    backends configured there, free and total bytes per GPU and of RAM, live replicas,
    max_loaded (0 = no limit), and bytes held by its idle unpinned replicas."""

    backends: tuple[str, ...] = ()
    gpu_free: tuple[int, ...] = ()
    gpu_total: tuple[int, ...] = ()
    ram_free: int = 0
    ram_total: int = 0
    loaded: int = 0
    max_loaded: int = 0
    evictable: int = 0


@dataclass(frozen=True, slots=True)
class RemoteHost:
    host_id: str
    epoch: int
    address: str
    role: str
    labels: Mapping[str, str]
    # Local monotonic time at which the host's lease runs out, as far as we know.
    expires: float
    # Published capacity (cluster/hostcap.py); zero/empty until it first publishes.
    figures: HostFigures = HostFigures()
    # Its database session ended (store.mark_dead): dead whatever this modeld's doubt.
    gone: bool = False


@dataclass
class ClusterView:
    host_id: str
    hosts: dict[str, RemoteHost] = field(default_factory=dict)
    replicas: dict[str, RemoteReplica] = field(default_factory=dict)
    # Called after a change with each host row that left (gone, or now at another address).
    on_leave: Callable[[RemoteHost], None] | None = None

    def replace_all(self, hosts: Iterable[RemoteHost], replicas: Iterable[RemoteReplica]) -> None:
        before = self.hosts
        self.hosts = {h.host_id: h for h in hosts}
        self.replicas = {r.id: r for r in replicas if self._current(r)}
        self._left(before.values())

    def replace_host(
        self, host_id: str, host: RemoteHost | None, replicas: Iterable[RemoteReplica]
    ) -> None:
        """What one re-read of a host returned: its row (None once gone) and its replicas."""
        old = self.hosts.get(host_id)
        if host is None:
            self.hosts.pop(host_id, None)
        else:
            self.hosts[host_id] = host
        kept = {k: r for k, r in self.replicas.items() if r.host_id != host_id}
        kept.update({r.id: r for r in replicas if self._current(r)})
        self.replicas = kept
        self._left([old] if old is not None else [])

    def refresh_expiry(self, near: Mapping[str, float], now: float, floor: float) -> None:
        """What an incremental resync knows of leases: `near` (host -> seconds left) for
        those running out soon, and for every other host that it lasts past `floor`."""
        for host_id, host in list(self.hosts.items()):
            left = near.get(host_id)
            expires = now + left if left is not None else max(host.expires, floor)
            if expires != host.expires:
                self.hosts[host_id] = replace(host, expires=expires)

    def shape(self) -> tuple[int, int]:
        """How many hosts, and the sum of their epochs (compared with the database's)."""
        return len(self.hosts), sum(h.epoch for h in self.hosts.values())

    def _left(self, before: Iterable[RemoteHost]) -> None:
        if self.on_leave is None:
            return
        for old in before:
            now = self.hosts.get(old.host_id)
            if now is None or now.address != old.address:
                self.on_leave(old)

    def _current(self, replica: RemoteReplica) -> bool:
        # Rows of an older epoch are a fenced host's leftovers: never shown.
        host = self.hosts.get(replica.host_id)
        return host is not None and host.epoch == replica.epoch

    def alive(self, host_id: str, now: float, trust_expired: bool) -> bool:
        """A host is routable until its lease deadline; `trust_expired` while our own
        database link is down or freshly back (then everyone looks expired)."""
        host = self.hosts.get(host_id)
        return host is not None and not host.gone and (trust_expired or now < host.expires)

    def expired(self, now: float) -> list[RemoteHost]:
        return sorted((h for h in self.hosts.values() if h.expires <= now), key=lambda h: h.expires)

    def candidates(
        self, model: str, now: float, *, trust_expired: bool, exclude: Iterable[str] = ()
    ) -> list[RemoteReplica]:
        """READY replicas of `model` on live hosts other than this one."""
        skip = set(exclude)
        return [
            r
            for r in self.replicas.values()
            if r.model == model
            and r.state is ReplicaState.READY
            and r.host_id != self.host_id
            and r.id not in skip
            and self.alive(r.host_id, now, trust_expired)
        ]
