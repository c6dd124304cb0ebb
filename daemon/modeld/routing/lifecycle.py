"""Lifecycle: which replicas should exist: load, unload, min_replicas, scale-out, shutdown.

Starts go through the model's pool (which coalesces them and keeps the pending
ones visible); stops go through the `Stopper`. The lifecycle owns the closing
gate: once `close()` has begun, no start is begun and no replica is created,
even by a start that was already waiting in admission (it is cancelled, and the
gate is checked again, with no await, right before a replica is created).

In a cluster every start needs one of its model's max_replicas slots (cluster/claims.py):
a `SlotGate` then takes the scale-outs, which would otherwise begin here without one, and
a Route that finds no start to join is refused rather than start one. Single-host mode
has no gate. The gate is `ScaleUps`, built by the daemon before the router and handed
to it and to the cluster, whose slot gate takes the requests (cluster/slotgate.py): the
two depend on each other at run time, so neither is patched after it is built.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import structlog

from modeld.clock import Clock
from modeld.errors import DeadlineExceeded, NotFound, RetryRoute, Unavailable
from modeld.info import ReplicaInfo
from modeld.policy import capacity
from modeld.routing.index import ReplicaIndex
from modeld.routing.pool import ModelPool, ready
from modeld.routing.routed import Listener, RoutedReplica
from modeld.routing.stops import Stopper
from modeld.spec import ModelSpec, check_replica_count
from modeld.state import STARTING_STATES, ReplicaState
from modeld.storage.catalog import Catalog

log = structlog.get_logger(__name__)
T = TypeVar("T")

# Admission decides (and carries out) what must stop first, and returns the GPU ids.
Admit = Callable[[ModelSpec, float], Awaitable[tuple[int, ...]]]
# Creates (does not start) a replica; the listener hears each of its state changes.
Factory = Callable[[ModelSpec, tuple[int, ...], Listener], RoutedReplica]
# How long a background start (min_replicas, scale-out) may wait for admission.
MIN_REPLICA_WAIT = 600.0
SHUTTING_DOWN = "modeld is shutting down"


class SlotGate(Protocol):
    """Cluster mode's starts: only under a slot, on the host placement picks."""

    def scale_up(self, spec: ModelSpec) -> None:
        """Begin one more replica somewhere in the cluster, in the background: the
        Route that asked must not wait on the database."""


class ScaleUps:
    """Cluster mode's scale-out requests, one pending per model: the lifecycle posts
    them (never awaiting), the cluster's slot gate takes them in order."""

    def __init__(self) -> None:
        self._wanted: dict[str, ModelSpec] = {}
        self._posted = asyncio.Event()

    def scale_up(self, spec: ModelSpec) -> None:
        self._wanted[spec.name] = spec
        self._posted.set()

    async def next(self) -> ModelSpec:
        while not self._wanted:
            self._posted.clear()
            await self._posted.wait()
        name = next(iter(self._wanted))
        return self._wanted.pop(name)


class Lifecycle:
    """Implements the pool's `Launcher`: admission, then creation behind the gate."""

    def __init__(
        self,
        *,
        clock: Clock,
        catalog: Catalog,
        index: ReplicaIndex,
        stopper: Stopper,
        admit: Admit,
        factory: Factory,
        gate: SlotGate | None = None,
    ) -> None:
        self._clock = clock
        self._catalog = catalog
        self._index = index
        self._stopper = stopper
        self._admit = admit
        self._factory = factory
        self._closed = False
        # Cluster mode's: every start under a slot. None: one host.
        self._gate = gate

    # the launcher

    @property
    def closed(self) -> bool:
        return self._closed

    def check_open(self) -> None:
        if self._closed:
            raise Unavailable(f"{SHUTTING_DOWN}; no replica is started")

    async def admit(self, spec: ModelSpec, deadline: float) -> tuple[int, ...]:
        return await self._admit(spec, deadline)

    def create(self, spec: ModelSpec, gpu_ids: tuple[int, ...]) -> RoutedReplica:
        self.check_open()
        return self._factory(spec, gpu_ids, self._stopper.on_change)

    def start(
        self, pool: ModelPool, spec: ModelSpec, deadline: float
    ) -> "asyncio.Task[RoutedReplica]":
        self.check_open()
        return pool.start(spec, deadline, self)

    def start_or_join(
        self, pool: ModelPool, spec: ModelSpec, deadline: float
    ) -> Awaitable[RoutedReplica]:
        self.check_open()
        if self._gate is not None and not pool.joinable():
            # The cluster's Route starts a cold model through its claim; this Route found
            # its local replica gone meanwhile, and a start here would hold no slot.
            raise RetryRoute(
                f"model {spec.name!r}: its replica on this host stopped while routing; "
                "retry the Route"
            )
        return pool.start_or_join(spec, deadline, self)

    # load / unload

    async def load(self, model: str, replicas: int, deadline: float) -> list[ReplicaInfo]:
        spec = self._catalog.get(model)
        check_replica_count(spec, replicas)
        pool = self._index.pool(model)
        servable = pool.servable()[:replicas]
        pending = pool.claim_pending(replicas - len(servable))
        missing = replicas - len(servable) - len(pending)
        if missing > 0:
            self.check_open()
            pool.check_backoff(deadline)
        # Nothing below can raise before every awaitable is awaited: no coroutine is lost.
        starts = [pool.start(spec, deadline, self) for _ in range(missing)]
        waits: list[Awaitable[RoutedReplica]] = [*pending, *starts]
        waits += [ready(r) for r in servable]
        await wait_until(asyncio.gather(*waits), deadline, self._clock, model)
        return [self._index.info(r) for r in pool.servable()]

    async def unload_model(self, model: str, force: bool, drain: float | None) -> list[ReplicaInfo]:
        pool = self._index.existing(model)
        if pool is None:
            self._catalog.get(model)
            return []
        cancelled = pool.cancel_pending("the model was unloaded")
        targets = pool.live()
        await asyncio.gather(
            *(self._stopper.stop(r, "unload", force, drain) for r in targets),
            *pool.pending_tasks(),
            return_exceptions=True,
        )
        infos = [self._index.pending_info(p) for p in cancelled]
        return infos + [self._index.info(r) for r in targets]

    async def unload_replica(
        self, replica_id: str, force: bool, drain: float | None
    ) -> list[ReplicaInfo]:
        replica = self._index.find(replica_id)
        if replica is None:
            raise NotFound(f"replica {replica_id[:64]!r} is not running")
        await self._stopper.stop(replica, "unload", force, drain)
        return [self._index.info(replica)]

    # background starts

    def maintain(self) -> list["asyncio.Task[RoutedReplica]"]:
        """Keep every model's min_replicas running; returns the starts it began.

        Single-host mode only: in a cluster, min_replicas counts the whole cluster and
        the cluster's leader keeps it (cluster/leader.py), so the daemon never calls this.
        """
        started: list[asyncio.Task[RoutedReplica]] = []
        if self._closed:
            return started
        for spec in self._catalog.list():
            if spec.min_replicas <= 0:
                continue
            pool = self._index.pool(spec.name)
            for _ in range(max(spec.min_replicas - pool.planned(), 0)):
                try:
                    started.append(pool.start(spec, self._background_deadline(), self))
                except Unavailable:
                    break
        return started

    def scale_out(self, pool: ModelPool, spec: ModelSpec, waiting: int) -> None:
        """One more replica in the background when Routes wait and every READY one is at
        `parallel` (policy/capacity.py); admission decides whether it may run."""
        if self._closed:
            return
        servable = pool.servable()
        ready = [r.in_flight for r in servable if r.state is ReplicaState.READY]
        starting = len(pool.admitting()) + sum(r.state in STARTING_STATES for r in servable)
        if not capacity.scale_out(
            ready_in_flight=ready,
            parallel=spec.parallel,
            waiting=waiting,
            starting=starting,
            planned=pool.planned(),
            max_replicas=spec.max_replicas,
        ):
            return
        if self._gate is not None:
            self._gate.scale_up(spec)
            return
        try:
            pool.start(spec, self._background_deadline(), self)
        except Unavailable:
            return
        log.info("scale_out", model=spec.name, parallel=spec.parallel, waiting=waiting)

    def _background_deadline(self) -> float:
        return self._clock.monotonic() + MIN_REPLICA_WAIT

    # shutdown

    async def close(self) -> None:
        """Close the gate, cancel every start in admission, stop every replica."""
        self._closed = True
        pools = self._index.pools()
        pending = []
        for pool in pools:
            pool.cancel_pending(SHUTTING_DOWN)
            pending += pool.pending_tasks()
        live = self._index.live()
        await asyncio.gather(
            *(self._stopper.stop(r, "shutdown", True, 0.0) for r in live),
            *pending,
            return_exceptions=True,
        )


async def wait_until(awaitable: Awaitable[T], deadline: float, clock: Clock, model: str) -> T:
    """Await a shared start without cancelling it when this caller's deadline passes."""
    remaining = deadline - clock.monotonic()
    if remaining <= 0:
        if asyncio.iscoroutine(awaitable):
            # Never awaited (a replica's `ready`): closed, so it is not reported as lost.
            awaitable.close()
        raise DeadlineExceeded(f"deadline passed before model {model!r} was ready")
    shared = asyncio.ensure_future(awaitable)
    # Once this caller gives up nobody may await the start any more: its outcome is
    # still retrieved, so that the loop never reports it as lost.
    shared.add_done_callback(_retrieve)
    try:
        return await asyncio.wait_for(asyncio.shield(shared), remaining)
    except TimeoutError:
        raise DeadlineExceeded(
            f"model {model!r} was not ready within the deadline; it is still starting and "
            "later requests will use it"
        ) from None


def _retrieve(task: "asyncio.Future[Any]") -> None:
    if not task.cancelled():
        task.exception()
