"""The replica index: every model's pool, lookups, and the read-only views of them.

Owns the pools (created on first use) and the latest resource readings the
watchdog hands over (free memory for the picker, measured memory per pid).
A replica's memory is the measured figure only once a reading begun at or after it
became READY has arrived; before that (loading, or a reading begun mid-load)
the process may not hold its model yet, so it counts at least its estimate.
Everything it returns is a snapshot (`ReplicaView` for policy, `ReplicaInfo`
for the API): nothing outside the owners mutates a replica.
"""

from collections import Counter
from collections.abc import Callable, Mapping

from modeld.capacity.sampler import NO_READING, ProcessReading
from modeld.clock import Clock
from modeld.info import ReplicaInfo
from modeld.policy.backoff import DEFAULT as DEFAULT_BACKOFF
from modeld.policy.backoff import BackoffPolicy
from modeld.policy.view import HostView, ReplicaView
from modeld.routing.pool import ModelPool, PendingStart
from modeld.routing.probe import ProbeCache
from modeld.routing.routed import RoutedReplica
from modeld.spec import ModelSpec
from modeld.state import ReplicaState


class ReplicaIndex:
    def __init__(
        self,
        *,
        clock: Clock,
        prober: ProbeCache,
        oldest_leases: Callable[[], Mapping[str, float]],
        backoff_policy: Callable[[ModelSpec], BackoffPolicy] = lambda _: DEFAULT_BACKOFF,
    ) -> None:
        self._clock = clock
        self._backoff_policy = backoff_policy
        self._prober = prober
        self._oldest_leases = oldest_leases
        self._pools: dict[str, ModelPool] = {}
        self.free_memory: Mapping[int | None, int] = {}
        self._processes = NO_READING

    def pool(self, model: str) -> ModelPool:
        pool = self._pools.get(model)
        if pool is None:
            pool = self._pools[model] = ModelPool(model, self._clock, self._backoff_policy)
        return pool

    def existing(self, model: str) -> ModelPool | None:
        return self._pools.get(model)

    def pools(self) -> list[ModelPool]:
        return list(self._pools.values())

    def live(self) -> list[RoutedReplica]:
        return [r for pool in self._pools.values() for r in pool.live()]

    def has_live(self, model: str) -> bool:
        """A replica that holds (or will hold) a process, or a start waiting in admission."""
        pool = self._pools.get(model)
        return bool(pool and (pool.live() or pool.admitting()))

    def find(self, replica_id: str) -> RoutedReplica | None:
        """A replica by id, live or among the recently ended ones."""
        for pool in self._pools.values():
            if replica_id in pool.replicas:
                return pool.replicas[replica_id]
        for pool in self._pools.values():
            for replica in pool.all():
                if replica.id == replica_id:
                    return replica
        return None

    # readings

    def observe(self, host: HostView, processes: ProcessReading) -> None:
        """Resource readings from the watchdog tick: free memory for the picker, per-pid use."""
        free: dict[int | None, int] = {g.index: g.free for g in host.gpus}
        free[None] = host.ram_available
        self.free_memory = free
        self._processes = processes

    def memory_of(self, replica: RoutedReplica) -> int:
        reading = self._processes
        measured = reading.by_pid.get(replica.pid) if replica.pid else None
        pool = self._pools.get(replica.model)
        ready_since = pool.ready_since(replica.id) if pool else None
        if measured is not None and ready_since is not None and reading.taken_at >= ready_since:
            return measured
        return max(measured or 0, replica.spec.memory_estimate)

    # snapshots

    def views(self) -> list[ReplicaView]:
        oldest = self._oldest_leases()
        return [self.view(r, r.spec, oldest) for r in self.live()]

    def view(self, r: RoutedReplica, spec: ModelSpec, oldest: Mapping[str, float]) -> ReplicaView:
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
        )

    def replicas(self, model: str | None) -> list[ReplicaInfo]:
        """What ListReplicas and `modeld ps` show: replicas, and starts still in admission."""
        pools = [self.pool(model)] if model else list(self._pools.values())
        out: list[ReplicaInfo] = []
        for pool in pools:
            out += [self.pending_info(p) for p in pool.cancelled()]
            out += [self.info(r) for r in pool.all()]
            out += [self.pending_info(p) for p in pool.admitting()]
        return out

    def info(self, r: RoutedReplica) -> ReplicaInfo:
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

    @staticmethod
    def pending_info(p: PendingStart) -> ReplicaInfo:
        return ReplicaInfo(
            id=p.id,
            model=p.spec.name,
            backend=p.spec.backend,
            state=p.state,
            started_at=p.since,
            last_error=f"cancelled: {p.reason}" if p.ended else "",
            memory=p.spec.memory_estimate,
        )

    # metrics sources

    def state_counts(self) -> dict[tuple[str, str], int]:
        counts: Counter[tuple[str, str]] = Counter()
        for pool in self._pools.values():
            for replica in pool.all():
                counts[(pool.model, replica.state.value)] += 1
            if pool.admitting():
                counts[(pool.model, ReplicaState.ADMITTING.value)] += len(pool.admitting())
        return dict(counts)

    def in_flight_counts(self) -> dict[str, int]:
        return {pool.model: sum(r.in_flight for r in pool.live()) for pool in self._pools.values()}
