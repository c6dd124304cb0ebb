"""An in-process Router over fake replicas, for tests where timing is the subject.

    async with router_harness(tmp_path, ModelSpec(name="m", backend="echo")) as h:
        lease = await h.router.route("m", h.deadline())
        h.clock.advance(601)

The registry, catalog and settings are real (a registry file under tmp_path);
replicas are `FakeReplica`s whose start, health and stop the test controls.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from modeld.clock import FakeClock
from modeld.errors import Unavailable
from modeld.ops.events import EventBus
from modeld.routing.probe import ProbeCache
from modeld.routing.router import Router
from modeld.spec import BackendSpec, ModelSpec, Settings
from modeld.state import ReplicaState
from modeld.storage.catalog import Catalog
from modeld.storage.registry import Registry
from modeld.storage.settings_store import SettingsStore
from modeld.supervisor.replica import Replica

S = ReplicaState
BACKEND = BackendSpec(name="echo", command=("true",))


class FakeReplica:
    """Duck-types supervisor.Replica: acquire/release as the real one, the rest scripted."""

    def __init__(
        self,
        rid: str,
        spec: ModelSpec,
        clock: FakeClock,
        *,
        gpu_ids: tuple[int, ...] = (),
        fail: str | None = None,
        gate: asyncio.Event | None = None,
    ) -> None:
        self.id = rid
        self.spec = spec
        self.model = spec.name
        self.gpu_ids = gpu_ids
        self.state = S.STARTING
        self.in_flight = 0
        self.last_used = clock.monotonic()
        self.idle_since: float | None = None
        self.healthy = True
        self.probes = 0
        self.probing = asyncio.Event()
        self.probe_gate: asyncio.Event | None = None
        self.stops: list[str] = []
        self.stop_requested = False
        self.stopped = asyncio.Event()
        self.address = f"fake:{rid}"
        self.protocol = "grpc"
        self.backend_name = "echo"
        self.pid: int | None = None
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.last_error = ""
        self.restarts = 0
        self.node_id = "local"
        self._clock = clock
        self._fail = fail
        self._gate = gate
        self._start: asyncio.Task[None] | None = None

    @property
    def gpu(self) -> str:
        return ",".join(str(i) for i in self.gpu_ids)

    async def ensure_ready(self) -> None:
        if self._start is None:
            self._start = asyncio.create_task(self._run())
        await asyncio.shield(self._start)
        if self.state is not S.READY:
            raise Unavailable(f"replica {self.id} is {self.state.value}: {self.last_error}")

    async def _run(self) -> None:
        if self._gate is not None:
            await self._gate.wait()
        if self._fail is not None:
            self.state, self.last_error = S.FAILED, self._fail
        elif self.state is S.STARTING:
            self.state = S.READY
            self.last_used = self._clock.monotonic()

    def acquire(self) -> bool:
        if self.state is not S.READY:
            return False
        self.in_flight += 1
        self.last_used = self._clock.monotonic()
        return True

    def release(self) -> None:
        if self.in_flight == 0:
            return
        self.in_flight -= 1
        self.last_used = self._clock.monotonic()

    async def probe(self, limit_s: float) -> bool:
        self.probes += 1
        self.probing.set()
        if self.probe_gate is not None:
            await self.probe_gate.wait()
        return self.healthy

    async def stop(
        self,
        reason: str,
        *,
        force: bool = False,
        drain_timeout: float = 30.0,
        responsive: bool = True,
    ) -> None:
        self.stops.append(reason)
        self.stop_requested = True
        self.state = S.STOPPED
        self.stopped.set()


@dataclass
class Harness:
    router: Router
    clock: FakeClock
    registry: Registry
    settings: SettingsStore
    events: EventBus
    made: list[FakeReplica] = field(default_factory=list)
    admitted: list[str] = field(default_factory=list)
    # Per model: how the next replicas start (popped in order); default: at once, healthy.
    scripts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    new_replica: asyncio.Event = field(default_factory=asyncio.Event)

    def deadline(self, seconds: float = 60.0) -> float:
        return self.clock.monotonic() + seconds

    def replica(self, rid: str) -> FakeReplica:
        return next(r for r in self.made if r.id == rid)

    async def made_replica(self, n: int, limit_s: float = 1.0) -> FakeReplica:
        """The n-th replica the factory made (1-based), once it exists."""

        async def made() -> FakeReplica:
            while len(self.made) < n:
                self.new_replica.clear()
                await self.new_replica.wait()
            return self.made[n - 1]

        return await asyncio.wait_for(made(), limit_s)


@contextlib.asynccontextmanager
async def router_harness(
    tmp_path: Path, *specs: ModelSpec, settings: Settings | None = None, **router_kw: Any
) -> AsyncIterator[Harness]:
    registry = await Registry.open(tmp_path / "modeld.db")
    clock = FakeClock()
    catalog = Catalog(registry, {"echo": BACKEND}, {}, {s.name: s for s in specs})
    await catalog.load()
    store = SettingsStore(registry, settings or Settings())
    events = EventBus()
    holder: list[Harness] = []

    def factory(spec: ModelSpec, gpu_ids: tuple[int, ...]) -> Replica:
        h = holder[0]
        script = h.scripts.get(spec.name, [])
        kw = script.pop(0) if script else {}
        replica = FakeReplica(f"{spec.name}-{len(h.made)}", spec, clock, gpu_ids=gpu_ids, **kw)
        h.made.append(replica)
        h.new_replica.set()
        return cast(Replica, replica)

    async def admit(spec: ModelSpec, deadline: float) -> tuple[int, ...]:
        holder[0].admitted.append(spec.name)
        return ()

    router = Router(
        clock=clock,
        catalog=catalog,
        settings=store,
        events=events,
        factory=factory,
        admit=admit,
        prober=ProbeCache(clock, lambda: store.current.probe_ttl),
        **router_kw,
    )
    holder.append(Harness(router, clock, registry, store, events))
    try:
        yield holder[0]
    finally:
        await router.close()
        await registry.close()


async def settle(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Let background starts finish (they run on the real loop, only the clock is fake)."""
    await asyncio.gather(*tasks, return_exceptions=True)
