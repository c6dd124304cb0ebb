"""Route / Release / RenewLease / Load / Unload / Health over in-memory replica state.

The router owns the model pools, the lease table and the probe cache. A warm
Route is a pure pick over in-memory views plus a dict insert: no disk I/O and no
lock. Cold starts are coalesced by the pool; lease expiry is one task waiting
for the earliest expiry; the counters reach the registry in batches (counters.py).
"""

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TypeVar

import structlog

from modeld.clock import Clock
from modeld.errors import DeadlineExceeded, FailedPrecondition, NotFound, Unavailable
from modeld.info import ReplicaInfo
from modeld.ops.events import Event, EventBus
from modeld.ops.metrics import Metrics
from modeld.policy.backoff import DEFAULT as DEFAULT_BACKOFF
from modeld.policy.backoff import BackoffPolicy
from modeld.policy.eviction import Eviction
from modeld.policy.picker import pick_replica
from modeld.policy.view import HostView, ReplicaView
from modeld.routing.counters import FLUSH_INTERVAL_S, CounterFlusher, Flush
from modeld.routing.leases import Lease, LeaseTable
from modeld.routing.pool import Admit, Factory, ModelPool, ready
from modeld.routing.probe import ProbeCache
from modeld.spec import ModelSpec
from modeld.state import LIVE, ReplicaState
from modeld.storage.catalog import Catalog
from modeld.storage.settings_store import SettingsStore
from modeld.supervisor.replica import Replica

log = structlog.get_logger(__name__)
T = TypeVar("T")

# A Route retries a pick this often after a start it joined ended without a usable replica.
ROUTE_ATTEMPTS = 4
DEFAULT_DRAIN = 30.0
# How long a background start for min_replicas may wait for admission.
MIN_REPLICA_WAIT = 600.0
_CRASH_SOURCES = frozenset({ReplicaState.READY, ReplicaState.DRAINING})


class Router:
    def __init__(
        self,
        *,
        clock: Clock,
        catalog: Catalog,
        settings: SettingsStore,
        events: EventBus,
        factory: Factory,
        admit: Admit,
        prober: ProbeCache,
        metrics: Metrics | None = None,
        flush: Flush | None = None,
        flush_interval: float = FLUSH_INTERVAL_S,
        backoff_policy: Callable[[ModelSpec], BackoffPolicy] = lambda _: DEFAULT_BACKOFF,
    ) -> None:
        self._clock = clock
        self._catalog = catalog
        self._settings = settings
        self._events = events
        self._factory = factory
        self._admit = admit
        self._prober = prober
        self._metrics = metrics
        self._flush = flush
        self._flush_interval = flush_interval
        self._backoff_policy = backoff_policy
        self._pools: dict[str, ModelPool] = {}
        self._leases = LeaseTable()
        self._wake = asyncio.Event()
        self._wake_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.free_memory: Mapping[int | None, int] = {}
        self._measured: dict[int, int] = {}
        self._capacity: asyncio.Event | None = None
        # Replicas a client reported unreachable, while their probe runs: routed to last.
        self._suspects: set[str] = set()
        self.counters: Counter[str] = Counter()

    # lifecycle

    def start(self) -> None:
        self._spawn(self._expiry_loop(), "lease-expiry")
        self._spawn(self._watch_events(), "router-events")
        if self._flush is not None:
            flusher = CounterFlusher(
                clock=self._clock,
                views=self.views,
                free_memory=lambda: self.free_memory,
                flush=self._flush,
                interval=self._flush_interval,
            )
            self._spawn(flusher.run(), "counter-flush")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        live = [r for pool in self._pools.values() for r in pool.live()]
        await asyncio.gather(*(self._stop(r, "shutdown", True, 0.0) for r in live))

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def pool(self, model: str) -> ModelPool:
        pool = self._pools.get(model)
        if pool is None:
            pool = self._pools[model] = ModelPool(
                model, self._clock, self._factory, self._admit, self._backoff_policy
            )
        return pool

    def pools(self) -> Iterable[ModelPool]:
        return self._pools.values()

    # hot path

    async def route(self, model: str, deadline: float) -> Lease:
        spec = self._catalog.get(model)
        pool = self.pool(model)
        cold = False
        for _ in range(ROUTE_ATTEMPTS):
            replica = self._pick(pool, spec)
            if replica is not None:
                # The least-loaded replica's leases before this one: the scale-up signal.
                load = replica.in_flight
                if replica.acquire():
                    self._maybe_scale_up(pool, spec, load)
                    return self._grant(replica, spec, cold)
            cold = True
            try:
                await wait_until(pool.start_or_join(spec, deadline), deadline, self._clock, model)
            except DeadlineExceeded:
                # A joined start may have run out of its first caller's (shorter) deadline.
                if self._clock.monotonic() >= deadline:
                    raise
        raise Unavailable(f"model {model!r}: replicas kept failing right after starting")

    def _pick(self, pool: ModelPool, spec: ModelSpec) -> Replica | None:
        ready = [r for r in pool.replicas.values() if r.state is ReplicaState.READY]
        if self._suspects and len(ready) > 1:
            ready = [r for r in ready if r.id not in self._suspects] or ready
        if len(ready) <= 1:
            return ready[0] if ready else None
        oldest = self._leases.oldest_started() if spec.busy_timeout else {}
        chosen = pick_replica([self.view(r, spec, oldest) for r in ready], self.free_memory)
        return pool.replicas[chosen.id] if chosen else None

    def _grant(self, replica: Replica, spec: ModelSpec, cold: bool) -> Lease:
        ttl = spec.lease_ttl if spec.lease_ttl is not None else self._settings.current.lease_ttl
        now = self._clock.monotonic()
        lease = Lease(
            id=uuid.uuid4().hex,
            replica=replica,
            model=spec.name,
            address=replica.address,
            protocol=replica.protocol,
            started=now,
            expires=now + ttl,
            expires_wall=self._clock.wall() + ttl,
            ttl=ttl,
            cold_start=cold,
        )
        self._leases.add(lease)
        if self._wake_at is None or lease.expires < self._wake_at:
            self._wake.set()
        self.counters["routes"] += 1
        return lease

    def _maybe_scale_up(self, pool: ModelPool, spec: ModelSpec, load: int) -> None:
        """Start one more replica in the background when even the least-loaded one is busy."""
        threshold = self._settings.current.scale_up_in_flight
        if not threshold or load < threshold:
            return
        if pool.pending() or pool.planned() >= spec.max_replicas:
            return
        with contextlib.suppress(Unavailable):
            pool.start(spec, self._clock.monotonic() + MIN_REPLICA_WAIT)
            log.info("scale_up", model=spec.name, threshold=threshold, in_flight=load)

    def release(self, lease_id: str, outcome: str) -> bool:
        lease = self._leases.pop(lease_id)
        if lease is None:
            return False
        lease.replica.release()
        self._capacity_changed()
        if outcome == "BACKEND_UNREACHABLE":
            replica = self.pool(lease.model).replicas.get(lease.replica_id)
            if replica is not None:
                self._spawn(self._suspect(replica), f"suspect-{replica.id}")
        return True

    def renew(self, lease_id: str) -> float:
        lease = self._leases.get(lease_id)
        if lease is None:
            raise NotFound(
                f"lease {lease_id[:64]!r} is not held: it was released or expired; Route again"
            )
        self._leases.renew(lease, self._clock.monotonic(), self._clock.wall())
        return lease.expires_wall

    async def _suspect(self, replica: Replica) -> None:
        """A client could not reach this replica: probe now; replace it if it is dead."""
        self._suspects.add(replica.id)
        self._prober.forget(replica.id)
        try:
            result = await self._prober.check(replica, force=True)
            if not result.ok and replica.state in LIVE:
                log.warning("replica_unreachable", replica_id=replica.id, model=replica.model)
                await self._stop(replica, "unreachable", True, 0.0, responsive=False)
        finally:
            self._suspects.discard(replica.id)

    # leases

    async def _expiry_loop(self) -> None:
        while True:
            self._wake_at = self._leases.next_expiry()
            timeout = (
                None if self._wake_at is None else max(self._wake_at - self._clock.monotonic(), 0)
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            self.expire_leases()

    def expire_leases(self) -> int:
        expired = self._leases.pop_expired(self._clock.monotonic())
        for lease in expired:
            lease.replica.release()
            self._capacity_changed()
            self.counters["leases_expired"] += 1
            if self._metrics is not None:
                self._metrics.lease_expired()
            log.info(
                "lease_expired", lease_id=lease.id, replica_id=lease.replica_id, model=lease.model
            )
            replica = self.pool(lease.model).replicas.get(lease.replica_id)
            state = replica.state if replica else ReplicaState.STOPPED
            self._events.publish(
                Event(
                    self._clock.wall(), lease.replica_id, lease.model, state, state, "lease_expired"
                )
            )
        return len(expired)

    def oldest_leases(self) -> dict[str, float]:
        return self._leases.oldest_started()

    def drop_leases(self, replica_id: str) -> int:
        """Expire every lease on a replica that is being stopped by force."""
        leases = self._leases.of_replica(replica_id)
        for lease in leases:
            if self._leases.pop(lease.id) is not None:
                lease.replica.release()
                self.counters["leases_expired"] += 1
        return len(leases)

    # load / unload

    async def load(self, model: str, replicas: int, deadline: float) -> list[ReplicaInfo]:
        spec = self._catalog.get(model)
        if replicas > spec.max_replicas:
            raise FailedPrecondition(
                f"model {model!r} allows at most {spec.max_replicas} replicas (max_replicas)"
            )
        pool = self.pool(model)
        waits: list[Awaitable[Replica]] = [ready(r) for r in pool.servable()[:replicas]]
        waits += [pool.start(spec, deadline) for _ in range(replicas - len(waits))]
        await wait_until(asyncio.gather(*waits), deadline, self._clock, model)
        return [self.info(r) for r in pool.servable()]

    async def unload_model(self, model: str, force: bool, drain: float | None) -> list[ReplicaInfo]:
        pool = self._pools.get(model)
        if pool is None:
            self._catalog.get(model)
            return []
        targets = pool.live()
        await asyncio.gather(*(self._stop(r, "unload", force, drain) for r in targets))
        return [self.info(r) for r in targets]

    async def unload_replica(
        self, replica_id: str, force: bool, drain: float | None
    ) -> list[ReplicaInfo]:
        replica = self.find(replica_id)
        if replica is None:
            raise NotFound(f"replica {replica_id[:64]!r} is not running")
        await self._stop(replica, "unload", force, drain)
        return [self.info(replica)]

    async def stop_replica(self, replica: Replica, reason: str, force: bool) -> None:
        await self._stop(replica, reason, force, None)

    async def _stop(
        self,
        replica: Replica,
        reason: str,
        force: bool,
        drain: float | None,
        *,
        responsive: bool = True,
    ) -> None:
        if force:
            self.drop_leases(replica.id)
        await replica.stop(
            reason,
            force=force,
            drain_timeout=DEFAULT_DRAIN if drain is None else drain,
            responsive=responsive,
        )
        self.drop_leases(replica.id)
        self._prober.forget(replica.id)
        self.pool(replica.model).prune()
        self._capacity_changed()

    # the watchdog's and admission's side

    def capacity_event(self) -> asyncio.Event:
        """Set the next time a lease ends or a replica stops (admission waits on it)."""
        if self._capacity is None:
            self._capacity = asyncio.Event()
        return self._capacity

    def _capacity_changed(self) -> None:
        if self._capacity is not None:
            self._capacity.set()
            self._capacity = None

    async def evict(self, eviction: Eviction, force: bool) -> None:
        replica = self.find(eviction.replica_id)
        if replica is None or replica.state not in LIVE or (replica.stop_requested and not force):
            # Someone else (admission or the watchdog) is already stopping it.
            return
        log.info(
            "replica_evicted",
            replica_id=replica.id,
            model=replica.model,
            reason=eviction.reason,
            detail=eviction.detail,
        )
        self.counters[f"evictions_{eviction.reason}"] += 1
        if self._metrics is not None:
            self._metrics.evicted(eviction.reason)
        await self._stop(replica, eviction.reason, force, None)

    def views(self) -> list[ReplicaView]:
        oldest = self._leases.oldest_started()
        return [self.view(r, r.spec, oldest) for pool in self._pools.values() for r in pool.live()]

    def observe(self, host: HostView, process_memory: dict[int, int]) -> None:
        """Resource readings from the watchdog tick: free memory for the picker, per-pid use."""
        free: dict[int | None, int] = {g.index: g.free for g in host.gpus}
        free[None] = host.ram_available
        self.free_memory = free
        self._measured = process_memory

    def memory_of(self, replica: Replica) -> int:
        measured = self._measured.get(replica.pid) if replica.pid else None
        return measured if measured is not None else replica.spec.memory_estimate

    def maintain(self) -> list[asyncio.Task[Replica]]:
        """Keep every model's min_replicas running; returns the starts it began."""
        started = []
        for spec in self._catalog.list():
            if spec.min_replicas <= 0:
                continue
            pool = self.pool(spec.name)
            missing = spec.min_replicas - pool.planned()
            for _ in range(max(missing, 0)):
                try:
                    started.append(pool.start(spec, self._clock.monotonic() + MIN_REPLICA_WAIT))
                except Unavailable:
                    break
        return started

    def state_counts(self) -> dict[tuple[str, str], int]:
        counts: Counter[tuple[str, str]] = Counter()
        for pool in self._pools.values():
            for replica in pool.all():
                counts[(pool.model, replica.state.value)] += 1
        return dict(counts)

    def in_flight_counts(self) -> dict[str, int]:
        return {pool.model: sum(r.in_flight for r in pool.live()) for pool in self._pools.values()}

    def find(self, replica_id: str) -> Replica | None:
        """A replica by id, live or among the recently ended ones."""
        for pool in self._pools.values():
            if replica_id in pool.replicas:
                return pool.replicas[replica_id]
        for pool in self._pools.values():
            for replica in pool.all():
                if replica.id == replica_id:
                    return replica
        return None

    # health and listings

    async def health(self, models: list[str], *, probe: bool) -> dict[str, list[ReplicaInfo]]:
        async def one(replica: Replica) -> None:
            if replica.state is ReplicaState.READY:
                await self._prober.check(replica, force=probe)

        pools = [self.pool(m) for m in models]
        await asyncio.gather(*(one(r) for pool in pools for r in pool.live()))
        return {pool.model: [self.info(r) for r in pool.all()] for pool in pools}

    def replicas(self, model: str | None) -> list[ReplicaInfo]:
        pools = [self.pool(model)] if model else list(self._pools.values())
        return [self.info(r) for pool in pools for r in pool.all()]

    def has_live(self, model: str) -> bool:
        pool = self._pools.get(model)
        return bool(pool and pool.live())

    def live_replicas(self) -> list[Replica]:
        return [r for pool in self._pools.values() for r in pool.live()]

    def info(self, r: Replica) -> ReplicaInfo:
        probe = self._prober.last(r.id)
        offset = self._clock.wall() - self._clock.monotonic()
        return ReplicaInfo(
            id=r.id,
            model=r.model,
            backend=r.backend_name,
            state=r.state,
            address=r.address,
            pid=r.pid,
            in_flight=r.in_flight,
            last_used=r.last_used + offset if r.last_used else None,
            started_at=r.started_at,
            ready_at=r.ready_at,
            gpu=r.gpu,
            last_error=r.last_error,
            restarts=r.restarts,
            memory=self.memory_of(r),
            last_probe_ok=probe.ok if probe else False,
            last_probe_at=probe.wall if probe else None,
            node_id=r.node_id,
        )

    def view(self, r: Replica, spec: ModelSpec, oldest: Mapping[str, float]) -> ReplicaView:
        return ReplicaView(
            id=r.id,
            model=r.model,
            state=r.state,
            in_flight=r.in_flight,
            last_used=r.last_used,
            idle_since=r.idle_since,
            oldest_lease_started=oldest.get(r.id),
            gpu_ids=r.gpu_ids,
            memory=self.memory_of(r),
            pinned=spec.pinned,
            groups=spec.groups,
            idle_ttl=spec.idle_ttl,
            busy_timeout=spec.busy_timeout,
            started_at=r.last_used,
        )

    # crashes

    async def _watch_events(self) -> None:
        subscription = self._events.subscribe()
        try:
            async for event in subscription:
                self._on_event(event)
        finally:
            subscription.close()

    def _on_event(self, event: Event) -> None:
        if event.to_state is ReplicaState.READY:
            # Readiness was a successful health probe: no need to probe again at once.
            self._prober.record_ok(event.replica_id)
            # A loading replica that admission waited on may now be evictable.
            self._capacity_changed()
            return
        if event.to_state not in (ReplicaState.FAILED, ReplicaState.STOPPED):
            return
        self._capacity_changed()
        pool = self._pools.get(event.model)
        if pool is None:
            return
        if event.to_state is ReplicaState.FAILED and event.from_state in _CRASH_SOURCES:
            pool.note_crash(event.reason, event.replica_id)
            self.counters["crashes"] += 1
        self._prober.forget(event.replica_id)
        pool.prune()


async def wait_until(awaitable: Awaitable[T], deadline: float, clock: Clock, model: str) -> T:
    """Await a shared start without cancelling it when this caller's deadline passes."""
    remaining = deadline - clock.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded(f"deadline passed before model {model!r} was ready")
    try:
        return await asyncio.wait_for(asyncio.shield(awaitable), remaining)
    except TimeoutError:
        raise DeadlineExceeded(
            f"model {model!r} was not ready within the deadline; it is still starting and "
            "later requests will use it"
        ) from None
