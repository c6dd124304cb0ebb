"""An in-process Router over test replicas, for tests where timing is the subject.

    async with router_harness(tmp_path, ModelSpec(name="m", backend="echo")) as h:
        lease = await h.router.route("m", h.deadline())
        h.clock.advance(601)

The registry, catalog and settings are real (a registry file under tmp_path);
replicas are `FakeReplica`s whose start, health and stop the test controls: a
start can be held (`gate`), a stop can be held before it acts (`hold_stop`) and
while it stops (`stop_gate`), and a start gives up at once when a stop is
requested, as the real replica's does. In-flight slots are the shared
`supervisor.slots.Slots`, so the bookkeeping under test is the real one.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modeld.capacity.admission import Admission, Evictor
from modeld.capacity.resources import ResourceReader
from modeld.clock import FakeClock
from modeld.config import DEFAULT_MAX_LEASES, DEFAULT_MAX_LEASES_PER_REPLICA
from modeld.errors import Unavailable
from modeld.ops.events import Event, EventBus
from modeld.routing.leases import LeaseLimits
from modeld.routing.lifecycle import Admit
from modeld.routing.probe import ProbeCache
from modeld.routing.routed import Listener
from modeld.routing.router import Router, build_router
from modeld.spec import BackendSpec, ModelSpec, Settings
from modeld.state import ALLOWED, TERMINAL, ReplicaState
from modeld.storage.catalog import Catalog
from modeld.storage.registry import Registry
from modeld.storage.settings_store import SettingsStore
from modeld.supervisor.slots import Slots

S = ReplicaState
BACKEND = BackendSpec(name="echo", command=("true",))


class FakeReplica:
    """A replica without a process; satisfies `routing.index.RoutedReplica`."""

    def __init__(
        self,
        rid: str,
        spec: ModelSpec,
        clock: FakeClock,
        *,
        gpu_ids: tuple[int, ...] = (),
        fail: str | None = None,
        gate: asyncio.Event | None = None,
        stop_gate: asyncio.Event | None = None,
        hold_stop: asyncio.Event | None = None,
        events: EventBus | None = None,
        listener: Listener | None = None,
        pid: int | None = None,
    ) -> None:
        self.id = rid
        self.spec = spec
        self.model = spec.name
        self.gpu_ids = gpu_ids
        self.state = S.STARTING
        self.slots = Slots(clock.monotonic())
        self.healthy = True
        self.probes = 0
        self.probing = asyncio.Event()
        self.probe_gate: asyncio.Event | None = None
        # (reason, force) of every stop asked for.
        self.stop_calls: list[tuple[str, bool]] = []
        self.stopped = asyncio.Event()
        # (state, stop requested) at every slot given out: the stateful test checks them.
        self.granted_in: list[tuple[ReplicaState, bool]] = []
        self.address = f"fake:{rid}"
        self.protocol = "grpc"
        self.backend_name = "echo"
        self.backend = BACKEND
        self.probe_timeout = BACKEND.probe_limit
        # Whether its port refuses connections (proof of death to the health judge).
        self.refusing = False
        self.pid = pid
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.last_error = ""
        self.restarts = 0
        self.node_id = "local"
        self.stop_gate = stop_gate
        self.hold_stop = hold_stop
        self._clock = clock
        self._fail = fail
        self._gate = gate
        self._events = events
        self._listener = listener
        self._stop_requested = asyncio.Event()
        self._start: asyncio.Task[None] | None = None
        self._stop: asyncio.Task[None] | None = None

    @property
    def gpu(self) -> str:
        return ",".join(str(i) for i in self.gpu_ids)

    @property
    def stops(self) -> list[str]:
        return [reason for reason, _ in self.stop_calls]

    @property
    def in_flight(self) -> int:
        return self.slots.count

    @property
    def last_used(self) -> float:
        return self.slots.last_used

    @property
    def idle_since(self) -> float | None:
        return self.slots.idle_since

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested.is_set()

    def _to(self, new: ReplicaState, reason: str = "") -> None:
        old = self.state
        assert new in ALLOWED[old], f"{old} -> {new}"
        self.state = new
        if new is S.READY:
            self.slots.mark_ready(self._clock.monotonic())
        if new in TERMINAL:
            self.stopped.set()
        if self._listener is not None:
            self._listener(self, old, new, reason)
        if self._events is not None:
            self._events.publish(Event(self._clock.wall(), self.id, self.model, old, new, reason))

    async def ensure_ready(self) -> None:
        if self._start is None:
            if self.stop_requested or self.state in TERMINAL:
                raise Unavailable(f"replica {self.id} is {self.state.value}; it will not start")
            self._start = asyncio.create_task(self._run())
        await asyncio.shield(self._start)
        if self.stop_requested and self.state is not S.READY:
            raise Unavailable(f"replica {self.id} was stopped while starting")
        if self.state is not S.READY:
            raise Unavailable(f"replica {self.id} is {self.state.value}: {self.last_error}")

    async def _run(self) -> None:
        self._to(S.WAITING_READY, "spawned")
        if self._gate is not None:
            await _first(self._gate, self._stop_requested)
        if self.stop_requested:
            return
        if self._fail is not None:
            self.last_error = self._fail
            self._to(S.FAILED, self._fail)
        else:
            self._to(S.READY, "ready")

    def acquire(self, holder: str) -> bool:
        if self.state is not S.READY or self.stop_requested:
            return False
        self.slots.take(holder, self._clock.monotonic())
        self.granted_in.append((self.state, self.stop_requested))
        return True

    def release(self, holder: str) -> None:
        self.slots.give_back(holder, self._clock.monotonic())

    def crash(self, reason: str = "killed by signal SIGKILL") -> None:
        self.last_error = reason
        self._to(S.FAILED, reason)

    async def probe(self, limit_s: float) -> bool:
        self.probes += 1
        self.probing.set()
        if self.probe_gate is not None:
            await self.probe_gate.wait()
        return self.healthy

    async def refuses(self) -> bool:
        return self.refusing

    async def stop(
        self,
        reason: str,
        *,
        force: bool = False,
        drain_timeout: float = 30.0,
        responsive: bool = True,
    ) -> None:
        self.stop_calls.append((reason, force))
        self._stop_requested.set()
        if self._stop is None:
            self._stop = asyncio.create_task(self._stopping(reason, force))
        await asyncio.shield(self._stop)

    async def _stopping(self, reason: str, force: bool) -> None:
        if self.hold_stop is not None:
            await self.hold_stop.wait()
        if self._start is not None:
            await asyncio.wait((self._start,))
        if self.state in TERMINAL:
            return
        if self.state is S.READY:
            self._to(S.DRAINING, reason)
            if not force and self.slots.count:
                await self.slots.wait_idle()
        if self.state in TERMINAL:
            return
        self._to(S.STOPPING, reason)
        if self.stop_gate is not None:
            await self.stop_gate.wait()
        self._to(S.STOPPED, reason)

    def kill(self) -> None:
        if self.state not in TERMINAL:
            self._to(S.FAILED, "killed")


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


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
    # How replicas start when no script is left (default: at once, healthy).
    default_script: Callable[[], dict[str, Any]] = dict
    new_replica: asyncio.Event = field(default_factory=asyncio.Event)
    # When set by a test, admission holds every start until it is set.
    admit_gate: asyncio.Event | None = None
    admitting: asyncio.Event = field(default_factory=asyncio.Event)

    def deadline(self, seconds: float = 60.0) -> float:
        return self.clock.monotonic() + seconds

    def replica(self, rid: str) -> FakeReplica:
        return next(r for r in self.made if r.id == rid)

    async def made_replica(self, n: int, limit_s: float = 5.0) -> FakeReplica:
        """The n-th replica the factory made (1-based), once it exists."""

        async def made() -> FakeReplica:
            while len(self.made) < n:
                self.new_replica.clear()
                await self.new_replica.wait()
            return self.made[n - 1]

        return await asyncio.wait_for(made(), limit_s)


@contextlib.asynccontextmanager
async def router_harness(
    tmp_path: Path,
    *specs: ModelSpec,
    settings: Settings | None = None,
    reader: ResourceReader | None = None,
    max_leases_per_replica: int = DEFAULT_MAX_LEASES_PER_REPLICA,
    max_leases: int = DEFAULT_MAX_LEASES,
    **router_kw: Any,
) -> AsyncIterator[Harness]:
    """A router built by the production wiring over test replicas. With `reader`,
    admission is the real one over those readings; without, it admits at once."""
    registry = await Registry.open(tmp_path / "modeld.db")
    clock = FakeClock()
    catalog = Catalog(registry, {"echo": BACKEND}, {}, {s.name: s for s in specs})
    await catalog.load()
    store = SettingsStore(registry, settings or Settings())
    events = EventBus()
    holder: list[Harness] = []

    def factory(spec: ModelSpec, gpu_ids: tuple[int, ...], listener: Listener) -> FakeReplica:
        h = holder[0]
        script = h.scripts.get(spec.name, [])
        kw = script.pop(0) if script else h.default_script()
        replica = FakeReplica(
            f"{spec.name}-{len(h.made)}",
            spec,
            clock,
            gpu_ids=gpu_ids,
            events=events,
            listener=listener,
            **kw,
        )
        h.made.append(replica)
        h.new_replica.set()
        return replica

    def admission(evictor: Evictor) -> Admit:
        real = (
            Admission(clock=clock, reader=reader, settings=store, evictor=evictor)
            if reader
            else None
        )

        async def admit(spec: ModelSpec, deadline: float) -> tuple[int, ...]:
            h = holder[0]
            h.admitted.append(spec.name)
            h.admitting.set()
            if h.admit_gate is not None:
                await h.admit_gate.wait()
            return await real.admit(spec, deadline) if real else ()

        return admit

    router = build_router(
        clock=clock,
        catalog=catalog,
        settings=store,
        events=events,
        factory=factory,
        admission=admission,
        prober=ProbeCache(clock, lambda: store.current.probe_ttl),
        limits=LeaseLimits(max_leases_per_replica, max_leases),
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
