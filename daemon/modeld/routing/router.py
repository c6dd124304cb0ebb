"""The route hot path, and the one facade the API and the daemon talk to.

The routing core is split so that each piece of mutable state has one owner,
and the wiring (`build_router`) constructs them in one order with no cycle:

    CapacitySignal  (routing/signal.py)    wakes admission when room may have appeared
    LeaseService    (routing/leases.py)    the lease table, expiry, bounds; in-flight slots
    ReplicaIndex    (routing/index.py)     the pools, lookups, views, resource readings
    HealthJudge     (routing/judge.py)     suspect or dead: a READY replica that did not answer
    Stopper         (routing/stops.py)     stops replicas; hears every replica state change
    Admission       (capacity/admission)   gets the Stopper as its evictor
    Lifecycle       (routing/lifecycle.py) load, unload, min_replicas, scale-out, closing gate
    RouteQueues     (routing/queue.py)     Routes waiting for a slot under `parallel`
    Router          (this module)          Route / Release / Renew / Health over the above

A warm Route is a pure pick over in-memory views plus a dict insert: no disk I/O
and no lock. A Route that finds every replica at its model's `parallel` (or others
already waiting) waits in the model's queue, which also asks for one more replica.
Cold starts are coalesced by the model's pool; the counters reach the registry in
batches (counters.py).
"""

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace

import structlog

from modeld.capacity.admission import Evictor
from modeld.capacity.sampler import ProcessReading
from modeld.clock import Clock
from modeld.errors import DeadlineExceeded, Unavailable
from modeld.info import ReplicaInfo
from modeld.ops.events import EventBus
from modeld.ops.metrics import Metrics
from modeld.ops.tasks import TaskSupervisor
from modeld.policy.affinity import AffinityInput
from modeld.policy.backoff import DEFAULT as DEFAULT_BACKOFF
from modeld.policy.backoff import BackoffPolicy
from modeld.policy.capacity import has_room
from modeld.policy.eviction import Eviction
from modeld.policy.load import LoadInput, ReportedLoad
from modeld.policy.picker import pick_replica
from modeld.policy.view import HostView, ReplicaView
from modeld.routing.index import ReplicaIndex
from modeld.routing.judge import HealthJudge
from modeld.routing.leases import Lease, LeaseLimits, LeaseService
from modeld.routing.lifecycle import Admit, Factory, Lifecycle, SlotGate, wait_until
from modeld.routing.loadscrape import LoadScraper
from modeld.routing.pool import ModelPool
from modeld.routing.probe import ProbeCache
from modeld.routing.queue import RouteQueues
from modeld.routing.rings import Rings
from modeld.routing.routed import RoutedReplica
from modeld.routing.signal import CapacitySignal
from modeld.routing.stops import Stopper
from modeld.spec import ModelSpec
from modeld.state import ReplicaState
from modeld.storage.catalog import Catalog
from modeld.storage.settings_store import SettingsStore

log = structlog.get_logger(__name__)

# A Route retries a pick this often after a start it joined ended without a usable replica.
ROUTE_ATTEMPTS = 4


class Router:
    def __init__(
        self,
        *,
        clock: Clock,
        catalog: Catalog,
        settings: SettingsStore,
        index: ReplicaIndex,
        leases: LeaseService,
        stopper: Stopper,
        lifecycle: Lifecycle,
        prober: ProbeCache,
        judge: HealthJudge,
        signal: CapacitySignal,
        tasks: TaskSupervisor,
        loads: LoadScraper | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._clock = clock
        self._catalog = catalog
        self._settings = settings
        self.index = index
        self.leases = leases
        self.stopper = stopper
        self.lifecycle = lifecycle
        self._prober = prober
        self._judge = judge
        self._signal = signal
        self._tasks = tasks
        self.loads = loads
        self._background: list[asyncio.Task[None]] = []
        # model -> the affinity ring over its READY replicas (policy/affinity.py).
        self._rings = Rings()
        self.queues = RouteQueues(
            clock=clock,
            catalog=catalog,
            index=index,
            leases=leases,
            pick=self._pick,
            grant=lambda replica, spec: self._grant(replica, spec, False),
            scale_out=lifecycle.scale_out,
            metrics=metrics,
        )
        signal.listen(self.queues.serve_all)

    # lifecycle of the router itself

    def start(self) -> None:
        self._background.append(self._tasks.spawn(self.leases.run(), "lease-expiry"))
        if self.loads is not None:
            for backend in self.loads.watched():
                task = self._tasks.spawn(self.loads.run(backend), f"load-scrape-{backend.name}")
                self._background.append(task)

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._judge.close()
        await self.lifecycle.close()

    # the hot path

    def route_now(self, model: str, affinity_key: str = "") -> Lease | None:
        """The warm Route, in this call: a lease on a READY replica with room, or None
        when the model has no READY replica with room, or Routes queue for one, and the
        caller must `route` (and wait).
        Refusals (unknown model, every replica full, lease bounds) raise as in `route`."""
        spec = self._catalog.get(model)
        pool = self.index.pool(model)
        self.leases.check_total()
        if self.queues.waiting(model):
            return None  # the Routes already queued go first (no barging)
        replica = self._pick(pool, spec, affinity_key)
        return None if replica is None else self._grant(replica, spec, False)

    async def route(self, model: str, deadline: float, affinity_key: str = "") -> Lease:
        spec = self._catalog.get(model)
        pool = self.index.pool(model)
        self.leases.check_total()
        cold = False
        for _ in range(ROUTE_ATTEMPTS):
            # Nobody takes a slot past the Routes already waiting for one (no barging).
            queued = self.queues.waiting(model)
            replica = None if queued else self._pick(pool, spec, affinity_key)
            if replica is not None:
                lease = self._grant(replica, spec, cold)
                if lease is not None:
                    return lease
            elif spec.parallel and pool.ready():
                lease = await self.queues.wait(pool, spec, deadline)
                if lease is not None:
                    return lease
                continue
            cold = True
            try:
                start = self.lifecycle.start_or_join(pool, spec, deadline)
                with pool.waiting(start):
                    await wait_until(start, deadline, self._clock, model)
            except DeadlineExceeded:
                # A joined start may have run out of its first caller's (shorter) deadline.
                if self._clock.monotonic() >= deadline:
                    raise
        raise Unavailable(f"model {model!r}: replicas kept failing right after starting")

    def _pick(
        self, pool: ModelPool, spec: ModelSpec, affinity_key: str = ""
    ) -> RoutedReplica | None:
        """The replica for the next lease; None when none is READY, or (with `parallel`)
        every READY one is full."""
        live = pool.ready()
        if not live:
            return None
        ready = [r for r in live if self.leases.room_on(r) and has_room(r.in_flight, spec.parallel)]
        if not ready:
            if spec.parallel:
                return None
            raise self.leases.full(spec.name)
        suspects = self._judge.suspects()
        if suspects and len(ready) > 1:
            ready = [r for r in ready if r.id not in suspects] or ready
        if len(ready) == 1:
            return ready[0]
        oldest = self.leases.oldest_started() if spec.busy_timeout else {}
        views = [self.index.view(r, spec, oldest) for r in ready]
        affinity = self._affinity(pool.model, live, affinity_key) if affinity_key else None
        load = self._load_input(spec)
        chosen = pick_replica(
            views, self.index.free_memory, spec.parallel, load=load, affinity=affinity
        )
        return pool.replicas[chosen.id] if chosen else None

    def _load_input(self, spec: ModelSpec) -> LoadInput | None:
        """What the model's backend reports, when it reports anything."""
        reported = self.loads.reported.get(spec.backend) if self.loads else None
        if not reported:
            return None
        backend = self._catalog.backend(spec.backend)
        return LoadInput(reported, backend.saturation_waiting)

    def _affinity(self, model: str, live: list[RoutedReplica], key: str) -> AffinityInput:
        """The key over the model's ring of READY replicas (built again when they change)."""
        ring = self._rings.ring(model, [r.id for r in live])
        return AffinityInput(ring, key, self.affinity_slack)

    @property
    def affinity_slack(self) -> float:
        return self._settings.current.affinity_slack

    def _grant(self, replica: RoutedReplica, spec: ModelSpec, cold: bool) -> Lease | None:
        """A lease on the picked replica; None when it gives no slot."""
        return self.leases.grant(replica, self._ttl(spec), cold)

    def _ttl(self, spec: ModelSpec) -> float:
        return spec.lease_ttl if spec.lease_ttl is not None else self._settings.current.lease_ttl

    def release(self, lease_id: str, outcome: str) -> bool:
        lease = self.leases.release(lease_id)
        if lease is None:
            return False
        if outcome == "BACKEND_UNREACHABLE":
            # Evidence, not a verdict: a client whose request timed out in a busy
            # server's queue says the same as one whose server died.
            replica = self.index.pool(lease.model).replicas.get(lease.replica_id)
            if replica is not None:
                self._judge.suspect(replica, "a client reported it unreachable")
        return True

    def renew(self, lease_id: str) -> float:
        return self.leases.renew(lease_id)

    def expire_leases(self) -> int:
        return self.leases.expire()

    # load / unload (the lifecycle's)

    async def load(self, model: str, replicas: int, deadline: float) -> list[ReplicaInfo]:
        return await self.lifecycle.load(model, replicas, deadline)

    async def unload_model(self, model: str, force: bool, drain: float | None) -> list[ReplicaInfo]:
        return await self.lifecycle.unload_model(model, force, drain)

    async def unload_replica(
        self, replica_id: str, force: bool, drain: float | None
    ) -> list[ReplicaInfo]:
        return await self.lifecycle.unload_replica(replica_id, force, drain)

    def maintain(self) -> list["asyncio.Task[RoutedReplica]"]:
        return self.lifecycle.maintain()

    # health and listings

    async def health(self, models: list[str], *, probe: bool) -> dict[str, list[ReplicaInfo]]:
        async def one(replica: RoutedReplica) -> None:
            if replica.state is ReplicaState.READY:
                result = await self._prober.check(replica, force=probe)
                if not result.ok:
                    why = f"a health probe failed (probe_timeout {replica.probe_timeout:g}s)"
                    self._judge.suspect(replica, why, failed_at=result.at)

        pools = [self.index.pool(m) for m in models]
        await asyncio.gather(*(one(r) for pool in pools for r in pool.live()))
        return {
            pool.model: [self._judged(self.index.info(r)) for r in pool.all()] for pool in pools
        }

    def replicas(self, model: str | None) -> list[ReplicaInfo]:
        """Each with its live lease count, read in the same loop turn as its in-flight
        (no await between them), so that anyone outside can check the two are equal."""
        leases = self.leases.per_replica()
        reason = self._judge.reason
        reported = self.loads.reported if self.loads else {}
        return [
            _with_load(
                replace(info, live_leases=leases.get(info.id, 0), suspect=reason(info.id)),
                reported.get(info.backend, {}).get(info.id),
            )
            for info in self.index.replicas(model)
        ]

    def _judged(self, info: ReplicaInfo) -> ReplicaInfo:
        return replace(info, suspect=self._judge.reason(info.id))

    def has_live(self, model: str) -> bool:
        return self.index.has_live(model)

    def live_replicas(self) -> list[RoutedReplica]:
        return self.index.live()

    def find(self, replica_id: str) -> RoutedReplica | None:
        return self.index.find(replica_id)

    def pool(self, model: str) -> ModelPool:
        return self.index.pool(model)

    def views(self) -> list[ReplicaView]:
        return self.index.views()

    def observe(self, host: HostView, processes: ProcessReading) -> None:
        self.index.observe(host, processes)

    async def evict(self, eviction: Eviction, force: bool) -> None:
        await self.stopper.evict(eviction, force)

    def capacity_event(self) -> asyncio.Event:
        return self._signal.event()

    def backend_loads(self) -> dict[tuple[str, str], tuple[int, int, float | None]]:
        """(model, replica id) -> what its backend last reported (the metrics' gauges)."""
        out: dict[tuple[str, str], tuple[int, int, float | None]] = {}
        reported = self.loads.reported if self.loads else {}
        for replica in self.index.live():
            load = reported.get(replica.backend_name, {}).get(replica.id)
            if load is not None:
                out[replica.model, replica.id] = (load.waiting, load.running, load.kv_cache)
        return out

    def leases_by_replica(self) -> dict[str, int]:
        """Live leases per replica id (the soak compares them with in-flight)."""
        return self.leases.per_replica()


def _with_load(info: ReplicaInfo, load: ReportedLoad | None) -> ReplicaInfo:
    if load is None:
        return info
    return replace(
        info, load_waiting=load.waiting, load_running=load.running, kv_cache_usage=load.kv_cache
    )


def build_router(
    *,
    clock: Clock,
    catalog: Catalog,
    settings: SettingsStore,
    events: EventBus,
    factory: Factory,
    prober: ProbeCache,
    admission: Callable[[Evictor], Admit],
    metrics: Metrics | None = None,
    limits: LeaseLimits | None = None,
    tasks: TaskSupervisor | None = None,
    backoff_policy: Callable[[ModelSpec], BackoffPolicy] = lambda _: DEFAULT_BACKOFF,
    gate: SlotGate | None = None,
) -> Router:
    """Every part of the routing core, each built once, in dependency order."""
    signal = CapacitySignal()
    settings.watch(signal.changed)
    leases = LeaseService(
        clock=clock,
        events=events,
        on_freed=signal.changed,
        limits=limits or LeaseLimits(),
        metrics=metrics,
    )
    index = ReplicaIndex(
        clock=clock,
        prober=prober,
        oldest_leases=leases.oldest_started,
        backoff_policy=backoff_policy,
    )
    judge = HealthJudge(clock=clock, prober=prober, events=events, metrics=metrics)
    stopper = Stopper(
        index=index, leases=leases, prober=prober, judge=judge, signal=signal, metrics=metrics
    )
    judge.use_stop(_stop_dead(stopper))
    lifecycle = Lifecycle(
        clock=clock,
        catalog=catalog,
        index=index,
        stopper=stopper,
        admit=admission(stopper),
        factory=factory,
        gate=gate,
    )
    return Router(
        clock=clock,
        catalog=catalog,
        settings=settings,
        index=index,
        leases=leases,
        stopper=stopper,
        lifecycle=lifecycle,
        prober=prober,
        judge=judge,
        signal=signal,
        tasks=tasks or TaskSupervisor(),
        loads=LoadScraper(
            lambda: list(catalog.backends.values()),
            index.live,
            metrics.load_scrape_failed if metrics else lambda _backend: None,
        ),
        metrics=metrics,
    )


def _stop_dead(stopper: Stopper) -> Callable[[RoutedReplica, str], Awaitable[None]]:
    async def stop_dead(replica: RoutedReplica, reason: str) -> None:
        # Proven dead: its leases are gone with it, and a Free call would only time out.
        await stopper.stop(replica, reason, True, 0.0, responsive=False)

    return stop_dead
