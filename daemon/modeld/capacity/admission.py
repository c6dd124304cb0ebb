"""Carries out admission: what must stop before a new replica may start, and where it goes.

The decision is policy.eviction.plan_admission (pure); this module reads the
resources (in a worker thread, through the sampler: never blocking the event
loop), stops the chosen victims, waits (on the evictor's capacity event, up to
the caller's deadline) when only busy replicas stand in the way, and re-plans
until the new replica is admitted or refused. The capacity event is set by
whoever changes capacity (a lease ends, a replica stops, a setting changes).
It returns with no await between the final decision and the caller registering
the new replica, so two admissions can never both take the last slot.
"""

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Protocol

import structlog

from modeld.capacity.releasing import Releasing
from modeld.capacity.resources import ResourceReader
from modeld.capacity.sampler import Sampler
from modeld.clock import Clock
from modeld.errors import DeadlineExceeded, ResourceExhausted
from modeld.policy.eviction import Admission as Plan
from modeld.policy.eviction import Eviction, plan_admission, still_due
from modeld.policy.placement import default_gpu_count, place
from modeld.policy.view import HostView, ReplicaView
from modeld.spec import ModelSpec
from modeld.state import STARTING_STATES
from modeld.storage.settings_store import SettingsStore

log = structlog.get_logger(__name__)

# Rounds that evicted something; waiting rounds are bounded by the deadline instead.
MAX_EVICTION_ROUNDS = 16
# After a stop, the driver reports the GPU memory as free a little later: re-read this often.
FREED_READS = 10
FREED_INTERVAL = 0.05


class Evictor(Protocol):
    def views(self) -> list[ReplicaView]: ...

    def capacity_event(self) -> asyncio.Event:
        """An event set the next time a lease ends or a replica stops."""
        ...

    async def evict(self, eviction: Eviction, force: bool) -> None: ...


class Admission:
    def __init__(
        self,
        *,
        clock: Clock,
        reader: ResourceReader,
        settings: SettingsStore,
        evictor: Evictor,
        freed_reads: int = FREED_READS,
        freed_interval: float = FREED_INTERVAL,
        releasing: Releasing | None = None,
    ) -> None:
        self._clock = clock
        self._sampler = Sampler(reader, clock)
        self._settings = settings
        self._evictor = evictor
        self._freed_reads = freed_reads
        self._freed_interval = freed_interval
        self._releasing = releasing

    async def admit(self, spec: ModelSpec, deadline: float) -> tuple[int, ...]:
        """The GPU ids for a new replica of `spec`, once there is room for it.

        Raises ResourceExhausted when it can never fit (nothing is evicted then) and
        DeadlineExceeded when the replicas in its way stay busy past the deadline.
        """
        rounds = 0
        waited_for = ""
        while True:
            if self._releasing is not None:
                # Memory of stopped replicas that a GPU still lists is not free yet.
                await self._releasing.wait_released(deadline)
            # Taken before the reading, so a change during this round is never missed.
            capacity = self._evictor.capacity_event()
            host = await self._sampler.host()
            views = self._evictor.views()
            gpu_ids, plan = self._plan(spec, host, views)
            if plan.refuse is not None:
                raise ResourceExhausted(f"cannot start model {spec.name!r}: {plan.refuse}")
            if plan.wait:
                if plan.detail != waited_for:
                    waited_for = plan.detail
                    log.info("admission_waiting", model=spec.name, why=plan.detail)
                await self._wait(capacity, spec, deadline, plan.detail)
            elif plan.evict:
                rounds += 1
                if rounds > MAX_EVICTION_ROUNDS:
                    raise ResourceExhausted(
                        f"cannot start model {spec.name!r}: still no room after "
                        f"{MAX_EVICTION_ROUNDS} rounds of evictions"
                    )
                await self._evict(plan.evict, host, views)
            else:
                return gpu_ids

    def _plan(
        self, spec: ModelSpec, host: HostView, views: Sequence[ReplicaView]
    ) -> tuple[tuple[int, ...], Plan]:
        reserved = _by_gpu(v for v in views if v.state in STARTING_STATES)
        count = spec.gpus if spec.gpus is not None else default_gpu_count(host.gpus)
        gpu_ids = place(host.gpus, count, spec.gpu_ids, reserved)
        target = gpu_ids[0] if gpu_ids else None
        plan = plan_admission(
            views,
            spec.name,
            incoming_groups=spec.groups,
            incoming_memory=spec.memory_estimate,
            target_gpu=target,
            settings=self._settings.current,
            host=host,
            reserved=reserved.get(target, 0) if target is not None else 0,
        )
        return gpu_ids, plan

    async def _wait(
        self, capacity: asyncio.Event, spec: ModelSpec, deadline: float, why: str
    ) -> None:
        remaining = deadline - self._clock.monotonic()
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(capacity.wait(), remaining)
                return
        raise DeadlineExceeded(f"model {spec.name!r} could not start before the deadline: {why}")

    async def _evict(
        self, evictions: Sequence[Eviction], before: HostView, views: Sequence[ReplicaView]
    ) -> None:
        force = self._settings.current.force_eviction_when_busy
        done = await asyncio.gather(
            *(evict_if_due(self._evictor.views, self._evictor.evict, e, force) for e in evictions)
        )
        victims = {e.replica_id for e, evicted in zip(evictions, done, strict=True) if evicted}
        freed = _by_gpu(v for v in views if v.id in victims)
        if freed:
            await self._await_freed(before, freed)

    async def _await_freed(self, before: HostView, freed: Mapping[int, int]) -> None:
        """Give the driver a short, bounded window to report the victims' memory as free.

        NVML has no change notification: between reads this waits on the capacity
        event (another stop, a lease ending) with a short deadline, for a few reads,
        then lets the re-plan decide.
        """
        expected = {
            gpu.index: gpu.used - freed[gpu.index] for gpu in before.gpus if gpu.index in freed
        }
        for _ in range(self._freed_reads):
            changed = self._evictor.capacity_event()
            now = await self._sampler.host()
            if all(g.used <= expected[g.index] for g in now.gpus if g.index in expected):
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), self._freed_interval)
        log.info("freed_memory_not_seen", gpus=sorted(expected))


async def evict_if_due(
    views: Callable[[], list[ReplicaView]],
    evict: Callable[[Eviction, bool], Awaitable[None]],
    eviction: Eviction,
    force: bool,
) -> bool:
    """Carry out an eviction unless its victim changed since it was chosen; True if it was.

    A stop runs a loop turn or more after its decision, and a Route may lease the victim
    in between. The fresh check and the stop request run with no await between them.
    """
    current = next((v for v in views() if v.id == eviction.replica_id), None)
    if not still_due(current, force):
        log.info(
            "eviction_dropped",
            replica_id=eviction.replica_id,
            model=eviction.model,
            reason=eviction.reason,
            why="the replica is gone or busy since it was chosen",
        )
        return False
    await evict(eviction, force)
    return True


def _by_gpu(views: Iterable[ReplicaView]) -> dict[int, int]:
    """Memory per GPU index; a multi-GPU replica's is split evenly across its GPUs."""
    out: dict[int, int] = {}
    for view in views:
        if view.memory <= 0 or not view.gpu_ids:
            continue
        share = view.memory // len(view.gpu_ids)
        for index in view.gpu_ids:
            out[index] = out.get(index, 0) + share
    return out
