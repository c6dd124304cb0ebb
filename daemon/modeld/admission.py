"""Carries out admission: what must stop before a new replica may start, and where it goes.

The decision is policy.eviction.plan_admission (pure); this module reads the
resources, stops the chosen victims, waits (on an event, up to the caller's
deadline) when only busy replicas stand in the way, and re-plans until the new
replica is admitted or refused. It returns with no await between the final
decision and the caller registering the new replica, so two admissions can
never both take the last slot.
"""

import asyncio
from collections.abc import Sequence
from typing import Protocol

import structlog

from modeld.clock import Clock
from modeld.errors import DeadlineExceeded, ResourceExhausted
from modeld.policy.eviction import Eviction, plan_admission
from modeld.policy.placement import default_gpu_count, place
from modeld.policy.view import HostView, ReplicaView
from modeld.resources import ResourceReader
from modeld.settings_store import SettingsStore
from modeld.spec import ModelSpec
from modeld.state import STARTING_STATES

log = structlog.get_logger(__name__)

MAX_ROUNDS = 32
# After a stop, GPU memory is freed by the driver a little later: re-read this often.
FREED_READS = 10
FREED_INTERVAL = 0.05


class Evictor(Protocol):
    def views(self) -> list[ReplicaView]: ...

    def capacity_event(self) -> asyncio.Event: ...

    async def evict(self, eviction: Eviction, force: bool) -> None: ...


class Admission:
    def __init__(
        self, *, clock: Clock, reader: ResourceReader, settings: SettingsStore, evictor: Evictor
    ) -> None:
        self._clock = clock
        self._reader = reader
        self._settings = settings
        self._evictor = evictor

    async def admit(self, spec: ModelSpec, deadline: float) -> tuple[int, ...]:
        for _ in range(MAX_ROUNDS):
            host = self._reader.read()
            views = self._evictor.views()
            gpu_ids = self._place(spec, host, views)
            target = gpu_ids[0] if gpu_ids else None
            plan = plan_admission(
                views,
                spec.name,
                incoming_groups=spec.groups,
                incoming_memory=spec.memory_estimate,
                target_gpu=target,
                settings=self._settings.current,
                host=host,
                reserved=_reserved(views, target),
            )
            if plan.refuse is not None:
                raise ResourceExhausted(f"cannot start model {spec.name!r}: {plan.refuse}")
            if plan.wait:
                await self._wait_for_capacity(spec, deadline, plan.detail)
            elif plan.evict:
                await self._evict(plan.evict, host)
            else:
                return gpu_ids
        raise ResourceExhausted(f"cannot start model {spec.name!r}: admission kept changing")

    def _place(
        self, spec: ModelSpec, host: HostView, views: Sequence[ReplicaView]
    ) -> tuple[int, ...]:
        count = spec.gpus if spec.gpus is not None else default_gpu_count(host.gpus)
        reserved: dict[int, int] = {}
        for view in views:
            if view.state in STARTING_STATES and view.device is not None:
                reserved[view.device] = reserved.get(view.device, 0) + view.memory
        return place(host.gpus, count, spec.gpu_ids, reserved)

    async def _wait_for_capacity(self, spec: ModelSpec, deadline: float, why: str) -> None:
        remaining = deadline - self._clock.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(
                f"model {spec.name!r} could not start before the deadline: {why}"
            )
        log.info("admission_waiting", model=spec.name, why=why)
        try:
            await asyncio.wait_for(self._evictor.capacity_event().wait(), remaining)
        except TimeoutError:
            raise DeadlineExceeded(
                f"model {spec.name!r} could not start before the deadline: {why}"
            ) from None

    async def _evict(self, evictions: Sequence[Eviction], before: HostView) -> None:
        force = self._settings.current.force_eviction_when_busy
        await asyncio.gather(*(self._evictor.evict(e, force) for e in evictions))
        if any(e.reason == "memory" for e in evictions):
            await self._await_freed(before)

    async def _await_freed(self, before: HostView) -> None:
        """Give the driver a short, bounded window to report the memory as free.

        NVML has no change notification, so this is the one place that re-reads on
        an interval; it gives up after FREED_READS and lets the re-plan decide.
        """
        used_before = _used(before)
        for _ in range(FREED_READS):
            if _used(self._reader.read()) < used_before:
                return
            await asyncio.sleep(FREED_INTERVAL)


def _used(host: HostView) -> int:
    if host.gpus:
        return sum(g.used for g in host.gpus)
    return host.ram_total - host.ram_available


def _reserved(views: Sequence[ReplicaView], device: int | None) -> int:
    return sum(v.memory for v in views if v.state in STARTING_STATES and v.device == device)
