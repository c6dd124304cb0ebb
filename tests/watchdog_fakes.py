"""Fakes for the watchdog and admission tests: readings, settings, replicas, an evictor.

`FakeReplica` is the shared test replica of routing_fakes (real `Slots`: the idle
clock starts when the last lease ends) without a process, so a real Router can
route to it on a FakeClock.
"""

import asyncio
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import routing_fakes
from modeld.clock import FakeClock
from modeld.errors import NotFound
from modeld.policy.eviction import Eviction
from modeld.policy.view import GpuView, HostView, ReplicaView
from modeld.routing.routed import Listener
from modeld.spec import ModelSpec, Settings
from modeld.state import ReplicaState

GIB = 1 << 30
R = ReplicaState
WAIT = 2.0


def gpu(index: int, used_gib: float, total_gib: int = 24) -> GpuView:
    return GpuView(index, f"GPU-{index}", "Fake", total_gib * GIB, int(used_gib * GIB))


def host(*gpus: GpuView, ram_total: int = 64 * GIB, ram_available: int = 32 * GIB) -> HostView:
    return HostView(ram_total, ram_available, gpus)


class StubReader:
    """Readings from a list: each read takes the next one, the last one repeats."""

    blocking = False  # in memory: the sampler reads it inline

    def __init__(self, *readings: HostView, processes: dict[int, int] | None = None) -> None:
        self.readings = list(readings) or [host()]
        self.processes = processes or {}
        self.reads = 0
        self.error: Exception | None = None

    def read(self) -> HostView:
        if self.error is not None:
            raise self.error
        self.reads += 1
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]

    def process_gpu_memory(self) -> dict[int, int]:
        return dict(self.processes)

    def set(self, *readings: HostView) -> None:
        self.readings = list(readings)


@dataclass
class StubSettings:
    """What Admission and the Watchdog read of the SettingsStore."""

    current: Settings = field(default_factory=Settings)
    watchers: list[Callable[[], None]] = field(default_factory=list)

    def watch(self, changed: Callable[[], None]) -> None:
        self.watchers.append(changed)


def view(id: str, model: str | None = None, **kw: object) -> ReplicaView:
    """An idle READY replica on GPU 0 holding 2 GiB, last used at 900."""
    base = ReplicaView(
        id=id,
        model=model or f"model-{id}",
        state=R.READY,
        in_flight=0,
        last_used=900.0,
        idle_since=900.0,
        oldest_lease_started=None,
        gpu_ids=(0,),
        memory=2 * GIB,
        pinned=False,
        groups=(),
        idle_ttl=None,
        busy_timeout=None,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def busy(id: str, model: str | None = None, **kw: object) -> ReplicaView:
    kw = {"in_flight": 1, "idle_since": None, "oldest_lease_started": 950.0, **kw}
    return view(id, model, **kw)


class WatchedEvent(asyncio.Event):
    """An asyncio.Event that tells the test when someone starts waiting on it."""

    def __init__(self, waiting: asyncio.Event) -> None:
        super().__init__()
        self._waiting = waiting

    async def wait(self) -> bool:
        self._waiting.set()
        return await super().wait()


class FakeEvictor:
    """The router's side of admission: views, the capacity event, evict (records it)."""

    def __init__(self, replicas: Iterable[ReplicaView] = ()) -> None:
        self.replicas = {r.id: r for r in replicas}
        self.evicted: list[tuple[Eviction, bool]] = []
        self.waiting = asyncio.Event()
        self._capacity: WatchedEvent | None = None

    def views(self) -> list[ReplicaView]:
        return list(self.replicas.values())

    def capacity_event(self) -> asyncio.Event:
        if self._capacity is None:
            self._capacity = WatchedEvent(self.waiting)
        return self._capacity

    async def evict(self, eviction: Eviction, force: bool) -> None:
        self.evicted.append((eviction, force))
        self.replicas.pop(eviction.replica_id, None)
        self.signal()

    def signal(self) -> None:
        """What the router does when a lease ends or a replica stops."""
        self.waiting.clear()
        if self._capacity is not None:
            self._capacity.set()
            self._capacity = None

    def update(self, replica: ReplicaView) -> None:
        self.replicas[replica.id] = replica


_pids = itertools.count(40000)


class FakeReplica(routing_fakes.FakeReplica):
    """The shared test replica with a pid (so measured memory applies); `stops` records
    (reason, force) pairs. `stop_gate`, set by a test, holds a stop: a slow backend."""

    def __init__(
        self,
        rid: str,
        spec: ModelSpec,
        gpu_ids: tuple[int, ...],
        clock: FakeClock,
        listener: Listener | None = None,
    ) -> None:
        super().__init__(rid, spec, clock, gpu_ids=gpu_ids, pid=next(_pids), listener=listener)
        self.address = f"127.0.0.1:{self.pid}"
        self.backend_name = "fake"

    @property
    def stops(self) -> list[tuple[str, bool]]:  # type: ignore[override]
        return list(self.stop_calls)


class FakeCatalog:
    def __init__(self, *specs: ModelSpec) -> None:
        self.specs = {s.name: s for s in specs}

    def get(self, name: str) -> ModelSpec:
        if name not in self.specs:
            raise NotFound(f"model {name!r} is not defined")
        return self.specs[name]

    def list(self) -> list[ModelSpec]:
        return list(self.specs.values())
