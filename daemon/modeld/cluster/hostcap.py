"""Host capacity across the cluster: what this host publishes, and what placement reads.

Each host publishes in its own host row the figures placement needs (backends,
free and total memory per GPU and of RAM, live replicas, max_loaded, bytes
evictable from idle unpinned replicas). Memory is floored to GRID so that noise
in the readings is not a change: the membership writes the row only when the
figures change, at most once a second. `capacities` turns the view's live hosts
into the `HostCapacity` rows `policy.host_placement.place` takes.
"""

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

from modeld.capacity.resources import ResourceReader
from modeld.capacity.sampler import Sampler
from modeld.clock import Clock
from modeld.cluster.store import MEMORY_GRID
from modeld.cluster.view import ClusterView, HostFigures, RemoteHost
from modeld.policy.host_placement import HostCapacity
from modeld.policy.view import HostView, ReplicaView
from modeld.state import ReplicaState

# Host figures are published on the replica rows' memory grid.
GRID = MEMORY_GRID
UNKNOWN = HostView(ram_total=0, ram_available=0, gpus=())
# A free-memory figure is written again only once it moved this many grid steps: a
# reading that hovers at a grid line would otherwise be a write (and a reread by
# every other host) each second, O(N^2) database work for an idle cluster.
HYSTERESIS = 2


def worth_publishing(new: HostFigures, old: HostFigures | None) -> bool:
    """Whether `new` differs from what was published in a way placement cares about:
    anything but free memory at once, free memory once it moved HYSTERESIS steps."""
    if old is None:
        return True
    if (new.backends, new.gpu_total, new.ram_total, new.loaded, new.max_loaded) != (
        old.backends,
        old.gpu_total,
        old.ram_total,
        old.loaded,
        old.max_loaded,
    ) or len(new.gpu_free) != len(old.gpu_free):
        return True
    pairs = [*zip(new.gpu_free, old.gpu_free, strict=True), (new.ram_free, old.ram_free)]
    pairs.append((new.evictable, old.evictable))
    return any(abs(a - b) >= HYSTERESIS * GRID for a, b in pairs)


def figures_of(
    backends: Iterable[str], host: HostView, views: Sequence[ReplicaView], max_loaded: int
) -> HostFigures:
    """This host's figures from one resource reading and the router's replica views."""
    gpus = sorted(host.gpus, key=lambda g: g.index)
    idle = [v for v in views if v.state is ReplicaState.READY and v.in_flight == 0 and not v.pinned]
    return HostFigures(
        backends=tuple(sorted(set(backends))),
        gpu_free=tuple(_grid(g.free) for g in gpus),
        gpu_total=tuple(_grid(g.total) for g in gpus),
        ram_free=_grid(host.ram_available),
        ram_total=_grid(host.ram_total),
        loaded=len(views),
        max_loaded=max_loaded,
        evictable=_grid(sum(v.memory for v in idle)),
    )


class LocalFigures:
    """Reads this host's figures: resources off the event loop (its own sampler)."""

    def __init__(
        self,
        backends: Iterable[str],
        reader: ResourceReader,
        views: Callable[[], list[ReplicaView]],
        max_loaded: Callable[[], int],
        clock: Clock,
    ) -> None:
        self._backends = tuple(backends)
        self._sampler = Sampler(reader, clock)
        self._views = views
        self._max_loaded = max_loaded

    async def read(self) -> HostFigures:
        try:
            host = await self._sampler.host()
        except (OSError, ValueError):
            # The watchdog logs unreadable resources; memory is published as unknown (0),
            # which placement never holds against a host, and the rest as it is.
            host = UNKNOWN
        return figures_of(self._backends, host, self._views(), self._max_loaded())


def capacities(view: ClusterView, now: float, *, trust_expired: bool) -> list[HostCapacity]:
    """The live hosts of the view as placement's input, with their replicas counted per
    model from the view's (current-epoch, live) replicas."""
    counts: dict[str, Counter[str]] = {}
    for replica in view.replicas.values():
        counts.setdefault(replica.host_id, Counter())[replica.model] += 1
    return [
        capacity_of(host, counts.get(host.host_id, Counter()))
        for host in sorted(view.hosts.values(), key=lambda h: h.host_id)
        if view.alive(host.host_id, now, trust_expired)
    ]


def capacity_of(host: RemoteHost, model_replicas: Mapping[str, int]) -> HostCapacity:
    figures = host.figures
    return HostCapacity(
        host_id=host.host_id,
        role=host.role,
        labels=dict(host.labels),
        backends=frozenset(figures.backends),
        gpu_free=figures.gpu_free,
        gpu_total=figures.gpu_total,
        ram_free=figures.ram_free,
        ram_total=figures.ram_total,
        loaded=figures.loaded,
        max_loaded=figures.max_loaded,
        evictable=figures.evictable,
        model_replicas=dict(model_replicas),
    )


def _grid(size: int) -> int:
    return max(size, 0) // GRID * GRID
