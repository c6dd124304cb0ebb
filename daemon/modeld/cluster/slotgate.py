"""Every replica of this host under one of its model's slots (`claims.py`).

- Scale-out on load (`parallel`): the local Router posts the request to `ScaleUps`
  (routing/lifecycle.py) instead of starting a replica itself, and this gate takes it
  (`_take_scale_ups`). It takes a slot in the background, so that the Route that asked
  never waits on the database, and the claim flow (`ColdStarts.start_claimed`) places
  the replica on the best host, which may be another one. No free slot: nothing starts,
  and the model is not tried again for `RETRY_S`, so that a busy model at max_replicas
  costs the database one read per period.
- A host back after its lease expired (SIGSTOP, a database outage; under a new epoch
  or its old one) publishes its replicas again, but others may have taken their slots
  meanwhile: every `period` this host checks (one read) that a claim names each of its
  published replicas; one that none names takes a free slot, or is stopped when none
  is free, so that max_replicas holds across the cluster.
"""

import asyncio
import contextlib

import structlog

from modeld import errors
from modeld.clock import Clock
from modeld.cluster.claims import Claim, ClaimStore
from modeld.cluster.coldstart import ColdStarts
from modeld.cluster.membership import Membership
from modeld.routing.lifecycle import MIN_REPLICA_WAIT, ScaleUps
from modeld.routing.router import Router
from modeld.spec import ModelSpec
from modeld.state import LIVE
from modeld.storage.catalog import Catalog

log = structlog.get_logger(__name__)
# After a scale-up found every slot held, the model's next one waits this long.
RETRY_S = 2.0


class SlotGate:
    def __init__(
        self,
        *,
        cold: ColdStarts,
        claims: ClaimStore,
        membership: Membership,
        router: Router,
        catalog: Catalog,
        clock: Clock,
        claim_ttl: float,
        period: float,
        requests: ScaleUps,
    ) -> None:
        self._requests = requests
        self._cold = cold
        self._claims = claims
        self._membership = membership
        self._router = router
        self._catalog = catalog
        self._clock = clock
        self._claim_ttl = claim_ttl
        self._period = period
        # model → its one scale-up in progress here; model → when the next may begin
        self._scaling: dict[str, asyncio.Task[None]] = {}
        self._not_before: dict[str, float] = {}
        self._loops: list[asyncio.Task[None]] = []

    def start(self) -> None:
        spawn = self._membership.spawn
        self._loops = [
            spawn(self._keep_slots(), "cluster-slots"),
            spawn(self._take_scale_ups(), "cluster-scale-ups"),
        ]

    async def close(self) -> None:
        tasks = [*self._scaling.values(), *self._loops]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # scale-up (what the Router posted to ScaleUps)

    async def _take_scale_ups(self) -> None:
        while True:
            self.scale_up(await self._requests.next())

    def scale_up(self, spec: ModelSpec) -> None:
        """Never awaits: the warm Route that asked goes on at once."""
        model = spec.name
        if model in self._scaling or self._clock.monotonic() < self._not_before.get(model, 0.0):
            return
        task = asyncio.create_task(self._scale_up(model), name=f"scale-up-{model}")
        self._scaling[model] = task
        task.add_done_callback(lambda t: self._scaled(model, t))

    def _scaled(self, model: str, task: "asyncio.Task[None]") -> None:
        if self._scaling.get(model) is task:
            del self._scaling[model]
        if not task.cancelled():
            task.exception()  # logged where it happened

    async def _scale_up(self, model: str) -> None:
        spec = self._catalog.get(model)
        try:
            decision = await self._claims.take(
                model, spec.max_replicas, self._claim_ttl, cold=False
            )
            if not isinstance(decision, Claim):
                self._not_before[model] = self._clock.monotonic() + RETRY_S
                log.info("cluster_scale_up_skipped", model=model, why=_why(decision))
                return
            deadline = self._clock.monotonic() + MIN_REPLICA_WAIT
            host = await self._cold.start_claimed(decision, spec, deadline)
        except errors.ModeldError as exc:
            self._not_before[model] = self._clock.monotonic() + RETRY_S
            log.warning("cluster_scale_up_failed", model=model, error=str(exc))
            return
        log.info("cluster_scale_up", model=model, host_id=host, slot=decision.slot)

    # this host's replicas keep their slots

    async def _keep_slots(self) -> None:
        while True:
            try:
                await self._retake()
            except errors.Unavailable as exc:
                log.warning("cluster_slots_retake_failed", error=str(exc))
            await asyncio.sleep(self._period)  # the check's period, not a synchronisation

    async def _retake(self) -> None:
        """A replica whose slot was taken while this host's lease had expired (a SIGSTOP,
        a database outage) takes a free one, or stops: max_replicas holds either way."""
        published = [
            i
            for i in self._router.replicas(None)
            if i.state in LIVE and self._cold.visible(i)  # a claimed load binds its own
        ]
        if not published or not self._membership.up:
            return
        lost = await self._claims.unclaimed([i.id for i in published])
        for info in (i for i in published if i.id in lost):
            try:
                spec = self._catalog.get(info.model)
            except errors.NotFound:
                continue  # deleted meanwhile: its replicas are being unloaded
            if await self._claims.adopt(info.model, spec.max_replicas, info.id):
                log.info("cluster_slot_retaken", model=info.model, replica_id=info.id)
                continue
            log.warning(
                "cluster_slot_lost_stopped",
                model=info.model,
                replica_id=info.id,
                max_replicas=spec.max_replicas,
            )
            with contextlib.suppress(errors.NotFound):
                await self._router.unload_replica(info.id, True, 0.0)


def _why(decision: object) -> str:
    why = getattr(decision, "why", None) or getattr(decision, "error", None)
    return str(why) if why else "every slot is held"
