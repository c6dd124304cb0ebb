"""Cold starts across the cluster: one claim, one load, every waiter routed to it.

A Route that finds no READY replica anywhere joins this modeld's one driver for the
model (`ensure`). The driver takes the model's claim (`claims.py`) or, when another
start holds it, waits for the view to change (NOTIFY), polling the claim as a
fallback. The claim owner renews the claim while its load goes on, asks hosts in
placement order to load (a refusal by a target's admission: the next host), and
the target publishes the replica only if the claim still holds (`load_claimed`):
a replica whose claim was taken over meanwhile is stopped instead. A failed load
is recorded on the claim, and every waiter, on any modeld, fails with its error.
"""

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Sequence

import structlog

from modeld import errors
from modeld.clock import Clock
from modeld.cluster.claims import Claim, ClaimStore, Decision, Failed, Full, Wait
from modeld.cluster.coldphase import Phase, Start
from modeld.cluster.counters import ClusterCounters
from modeld.cluster.forward import Load, Peers
from modeld.cluster.hostcap import capacities
from modeld.cluster.membership import Membership
from modeld.cluster.store import PublishedRow
from modeld.info import RemoteReplica, ReplicaInfo
from modeld.policy.backoff import DEFAULT as BACKOFF
from modeld.policy.host_placement import place, placement_mode
from modeld.routing.lifecycle import wait_until
from modeld.routing.router import Router
from modeld.spec import ModelSpec, check_replica_count
from modeld.state import LIVE, ReplicaState
from modeld.storage.catalog import Catalog

log = structlog.get_logger(__name__)
# How often a waiter reads the claim when no notification came (a failure is not one).
POLL_S = 0.25
# How long a Load retries when every slot is held (see _take_for_load).
FULL_GRACE_S = 2.0
# A claim outlives its owner's host row, so a host that stopped renewing is out of
# the view (and never asked to load) by the time its claim is taken over.
CLAIM_TTL_HOSTS = 3.0
# What a target's admission answers when it cannot take the replica: ask the next host.
# Anything else (a backend that failed, an unreachable target) fails the load.
REFUSALS = (errors.ResourceExhausted, errors.FailedPrecondition)
RowOf = Callable[[str], PublishedRow | None]


class TargetLost(Exception):
    """The host asked to load left the cluster meanwhile: ask the next one."""


class ColdStarts:
    def __init__(
        self,
        *,
        host_id: str,
        host_ttl: float,
        placement: str,
        router: Router,
        catalog: Catalog,
        membership: Membership,
        peers: Peers,
        claims: ClaimStore,
        clock: Clock,
        counters: ClusterCounters,
        row_of: RowOf,
    ) -> None:
        self._host = host_id
        self._ttl = host_ttl * CLAIM_TTL_HOSTS
        self._placement = placement
        self._router = router
        self._catalog = catalog
        self._membership = membership
        self._peers = peers
        self._claims = claims
        self._clock = clock
        self.counters = counters
        self._row_of = row_of
        # model → this modeld's one cold start of it (coldphase.py), while it runs
        self._starts: dict[str, Start] = {}
        # model → replica ids publishable while a claimed load of it runs here
        self._shown: dict[str, set[str]] = {}
        self._claimed_loads: dict[str, int] = {}
        self._fenced: set[str] = set()
        # Set (and replaced) when this host publishes a claimed replica: its own waiters
        # hear no notification of it (a host does not reread itself).
        self._bound = asyncio.Event()

    # what this host may publish

    def visible(self, info: ReplicaInfo) -> bool:
        """A replica started under a claim is published only by `bind`, and a fenced
        one never: the ordinary publish skips both."""
        if info.id in self._fenced:
            return False
        shown = self._shown.get(info.model)
        return shown is None or info.id in shown

    # Route: wait for (or drive) the one cold start

    async def ensure(self, model: str, deadline: float) -> None:
        """Returns once a READY replica of `model` is in sight; raises the start's error."""
        self._catalog.get(model)
        start = self._starts.get(model)
        if start is None:
            start = Start(model, "cold", until=deadline, stale=frozenset(self._candidates(model)))
            start.task = asyncio.create_task(self._drive(start), name=f"cold-start-{model}")
            self._starts[model] = start
            start.task.add_done_callback(functools.partial(self._driver_done, start))
        start.until = max(start.until, deadline)
        assert start.task is not None
        await wait_until(asyncio.shield(start.task), deadline, self._clock, model)

    def _driver_done(self, start: Start, task: "asyncio.Task[None]") -> None:
        if self._starts.get(start.model) is start:
            del self._starts[start.model]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have given up already

    def _candidates(self, model: str) -> list[RemoteReplica]:
        now = self._clock.monotonic()
        trust = self._membership.trust_expired()
        return self._membership.view.candidates(model, now, trust_expired=trust)

    def _ready(self, start: Start) -> bool:
        local = self._router.replicas(start.model)
        if any(i.state is ReplicaState.READY and self.visible(i) for i in local):
            return True
        return any(r not in start.stale for r in self._candidates(start.model))

    async def _drive(self, start: Start) -> None:
        try:
            await self._claim_until_ready(start)
        except errors.ModeldError as exc:
            start.to(Phase.FAILED, error=str(exc))
            raise
        start.to(Phase.READY)

    async def _claim_until_ready(self, start: Start) -> None:
        model = start.model
        spec = self._catalog.get(model)
        while not self._ready(start):
            start.to(Phase.CLAIMING)
            signals = self._signals()
            decision = await self._claims.take(model, spec.max_replicas, self._ttl, cold=True)
            if isinstance(decision, Failed):
                raise _error(decision)
            if isinstance(decision, Claim):
                self._taken(decision)
                start.to(Phase.PLACING, claim_id=decision.claim_id)
                await self._own(decision, spec, start)
                continue
            remaining = start.until - self._clock.monotonic()
            if remaining <= 0:
                raise errors.DeadlineExceeded(f"model {model!r}: no replica started in time")
            await _first(signals, min(POLL_S, remaining))

    def _signals(self) -> tuple[asyncio.Event, ...]:
        """Taken before looking, so that a change while looking is not missed."""
        return self._membership.changed(), self._bound

    def _taken(self, claim: Claim) -> None:
        self.counters.claims_taken += 1
        if claim.took_over:
            self.counters.claims_taken_over += 1
        log.info(
            "cluster_claim_taken",
            model=claim.model,
            slot=claim.slot,
            claim_id=claim.claim_id,
            took_over=claim.took_over,
        )

    async def _own(self, claim: Claim, spec: ModelSpec, start: Start) -> None:
        """As the claim's owner: place, load, and wait for the replica to be in sight."""
        async with self._renewing([claim]) as lost:
            try:
                host = await self._place_and_load(claim, spec, lost, start)
            except errors.ModeldError as exc:
                if not lost.is_set():
                    await self._fail([claim], exc)
                    raise
                host = None
        if host is None:
            # Lost: whoever took it over starts the model; this start waits for that.
            start.to(Phase.CLAIMING, reason="claim lost")
            return
        while not self._ready(start) and self._clock.monotonic() < start.until:
            await _first(self._signals(), POLL_S)

    async def start_claimed(self, claim: Claim, spec: ModelSpec, deadline: float) -> str | None:
        """As the owner of `claim` outside a cold start (a scale-up): one replica on the
        host placement picks; None when the claim was lost meanwhile. A start that
        fails gives the slot back (a busy cluster is no reason for a backoff)."""
        self._taken(claim)
        start = Start(claim.model, "scale-up", until=deadline, phase=Phase.PLACING)
        async with self._renewing([claim]) as lost:
            try:
                host = await self._place_and_load(claim, spec, lost, start)
            except errors.ModeldError as exc:
                start.to(Phase.FAILED, error=str(exc))
                if not lost.is_set():
                    with contextlib.suppress(errors.Unavailable):
                        await self._claims.release(claim)
                raise
        # Loaded: the host's Load answered once its replica was READY there.
        start.to(Phase.READY if host is not None else Phase.CLAIMING)
        return host

    async def _place_and_load(
        self, claim: Claim, spec: ModelSpec, lost: asyncio.Event, start: Start
    ) -> str | None:
        """The host that loaded it, or None when the claim was lost meanwhile."""
        view = self._membership.view
        now = self._clock.monotonic()
        # Not trust_expired(): a host whose lease ran out is not asked to start anything,
        # even by a modeld that just connected (whose view it may still be in).
        hosts = capacities(view, now, trust_expired=False)
        why: list[str] = []
        mode = placement_mode(spec, self._placement)
        for host_id in place(claim.model, spec, hosts, mode=mode, prefer=self._host):
            if lost.is_set():
                return None
            start.to(Phase.LOADING, host_id=host_id)
            try:
                await self._load_on(host_id, claim, start.until)
                start.to(Phase.SEEING, host_id=host_id)
                return host_id
            except REFUSALS as exc:
                if not await self._claims.renew(claim, self._ttl):
                    lost.set()
                    return None
                start.to(Phase.PLACING)
                self.counters.placement_refusals += 1
                log.info(
                    "cluster_placement_refused", model=claim.model, host_id=host_id, error=str(exc)
                )
                why.append(str(exc))
            except TargetLost as exc:
                start.to(Phase.PLACING)
                log.info("cluster_placement_target_lost", model=claim.model, host_id=host_id)
                why.append(str(exc))
        raise errors.ResourceExhausted(
            f"model {claim.model!r}: no host could start it: " + "; ".join(why or ["no host"])
        )

    async def _load_on(self, host_id: str, claim: Claim, deadline: float) -> None:
        if host_id == self._host:
            await self.load_claimed(claim.model, [claim], deadline)
            return
        host = self._membership.view.hosts.get(host_id)
        if host is None:
            raise TargetLost(f"host {host_id} left the cluster")
        request = Load(model=claim.model, replicas=1, host_id=host_id, address=host.address)
        timeout = max(deadline - self._clock.monotonic(), 0.001)
        load = asyncio.ensure_future(self._peers.load(request, timeout, marker=claim.marker))
        watch = asyncio.ensure_future(self._until_gone(host_id))
        try:
            await asyncio.wait([load, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (load, watch):
                task.cancel()
            await asyncio.gather(load, watch, return_exceptions=True)
        if load.cancelled():
            raise TargetLost(f"host {host_id} stopped renewing its membership while loading")
        try:
            load.result()
        except errors.PeerUnreachable as exc:
            # Not an answer of the target's (its backend failing would be): ask the next.
            raise TargetLost(str(exc)) from None

    async def _until_gone(self, host_id: str) -> None:
        """Returns once `host_id` is no longer alive in the view: a load there is lost
        (should it still finish, its claim is no longer loading, and it cannot publish)."""
        view = self._membership.view
        while view.alive(host_id, self._clock.monotonic(), self._membership.trust_expired()):
            await _first(self._signals(), POLL_S)

    # renewing and ending claims

    @contextlib.asynccontextmanager
    async def _renewing(self, claims: Sequence[Claim]) -> AsyncIterator[asyncio.Event]:
        """Renews `claims` every third of their TTL; the event is set once one is lost."""
        lost = asyncio.Event()
        task = asyncio.create_task(self._renew(claims, lost), name="cluster-claim-renew")
        try:
            yield lost
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if lost.is_set():
                self.counters.claims_lost += 1
                log.warning("cluster_claim_lost", model=claims[0].model, claims=len(claims))

    async def _renew(self, claims: Sequence[Claim], lost: asyncio.Event) -> None:
        while not lost.is_set():
            await asyncio.sleep(self._ttl / 3)  # the renewal period, not a synchronisation
            for claim in claims:
                try:
                    held = await self._claims.renew(claim, self._ttl)
                except errors.Unavailable:
                    continue  # the database is away; the claim may expire, fencing still holds
                if not held:
                    lost.set()

    async def _fail(self, claims: Sequence[Claim], exc: errors.ModeldError) -> None:
        log.warning("cluster_claim_failed", model=claims[0].model, error=str(exc))
        code = type(exc).__name__
        for claim in claims:
            with contextlib.suppress(errors.Unavailable):
                await self._claims.fail(claim, str(exc), code, BACKOFF.base, BACKOFF.cap)

    # loads on this host

    async def load_here(self, model: str, replicas: int, deadline: float) -> list[ReplicaInfo]:
        """A Load on this host: one slot per replica it starts, so max_replicas holds
        across the cluster; no free slot is a clear error, and nothing starts."""
        spec = self._catalog.get(model)
        check_replica_count(spec, replicas)
        ready = [i for i in self._router.replicas(model) if i.state is ReplicaState.READY]
        claims: list[Claim] = []
        for _ in range(replicas - len(ready)):
            decision = await self._take_for_load(model, spec, deadline)
            if isinstance(decision, Claim):
                self._taken(decision)
                claims.append(decision)
                continue
            for claim in claims:
                with contextlib.suppress(errors.Unavailable):
                    await self._claims.release(claim)
            raise _refusal(model, spec, decision)
        if not claims:
            return await self._router.load(model, replicas, deadline)
        async with self._renewing(claims) as lost:
            try:
                return await self.load_claimed(model, claims, deadline)
            except errors.ModeldError as exc:
                if not lost.is_set():
                    await self._fail(claims, exc)
                raise

    async def _take_for_load(self, model: str, spec: ModelSpec, deadline: float) -> Decision:
        """A slot for a Load; every slot held is retried for FULL_GRACE_S, since a host
        publishes that a replica went (a crash, an unload) a moment after it went."""
        until = min(deadline, self._clock.monotonic() + FULL_GRACE_S)
        while True:
            signals = self._signals()
            decision = await self._claims.take(model, spec.max_replicas, self._ttl, cold=False)
            remaining = until - self._clock.monotonic()
            if not isinstance(decision, Full) or remaining <= 0:
                return decision
            await _first(signals, min(POLL_S, remaining))

    async def load_claimed(
        self, model: str, claims: Sequence[Claim], deadline: float
    ) -> list[ReplicaInfo]:
        """Start one replica per claim here; each is published only if its claim holds."""
        before = {i.id for i in self._router.replicas(model) if i.state in LIVE}
        self._fenced &= {r.id for r in self._router.live_replicas()}
        ready = sum(1 for i in self._router.replicas(model) if i.state is ReplicaState.READY)
        self._shown.setdefault(model, set(before))
        self._claimed_loads[model] = self._claimed_loads.get(model, 0) + 1
        try:
            infos = await self._router.load(model, ready + len(claims), deadline)
            new = [i for i in infos if i.id not in before]
            lost = [c for c, i in zip(claims, new, strict=False) if not await self._bind(c, i)]
        finally:
            self._claimed_loads[model] -= 1
            if not self._claimed_loads[model]:
                del self._claimed_loads[model]
                await self._stop_unbound(model, self._shown.pop(model))
        for claim in claims[len(new) :]:
            with contextlib.suppress(errors.Unavailable):
                await self._claims.release(claim)  # a start already under way served it
        if lost:
            raise errors.FailedPrecondition(
                f"model {model!r}: claim {lost[0].claim_id} was taken over by another host "
                "while this one loaded; its replica was stopped, the other one serves"
            )
        return [i for i in infos if i.id not in self._fenced]

    async def _stop_unbound(self, model: str, shown: set[str]) -> None:
        """A replica begun under a claim whose load gave up (deadline, error) and that
        still starts was never bound: it is stopped, never published without a slot."""
        for info in self._router.replicas(model):
            if info.state in LIVE and info.id not in shown and info.id not in self._fenced:
                self._fenced.add(info.id)
                log.warning("cluster_claim_unbound_stopped", model=model, replica_id=info.id)
                with contextlib.suppress(errors.NotFound):
                    await self._router.unload_replica(info.id, True, 0.0)

    async def _bind(self, claim: Claim, info: ReplicaInfo) -> bool:
        row = self._row_of(info.id)
        if row is not None and await self._publish(claim, row):
            self._membership.adopt(row)
            self._shown[info.model].add(info.id)
            log.info(
                "cluster_claim_bound",
                model=claim.model,
                claim_id=claim.claim_id,
                replica_id=info.id,
            )
            self._bound.set()
            self._bound = asyncio.Event()
            return True
        self._fenced.add(info.id)
        log.warning(
            "cluster_claim_fenced", model=claim.model, claim_id=claim.claim_id, replica_id=info.id
        )
        with contextlib.suppress(errors.NotFound):
            await self._router.unload_replica(info.id, True, 0.0)
        return False

    async def _publish(self, claim: Claim, row: PublishedRow) -> bool:
        epoch = self._membership.epoch
        if epoch is None:
            return False
        try:
            return await self._claims.bind(claim, epoch, row)
        except errors.Unavailable:
            return False  # not published: stopped, as a fenced one, so that none is hidden

    async def close(self) -> None:
        tasks = [s.task for s in self._starts.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _first(events: Sequence[asyncio.Event], limit_s: float) -> None:
    """Until one of `events` is set, or `limit_s` (the poll fallback)."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def _error(failed: Failed) -> errors.ModeldError:
    kind = getattr(errors, failed.code, None)
    if not (isinstance(kind, type) and issubclass(kind, errors.ModeldError)):
        kind = errors.Unavailable
    return kind(f"{failed.error} (the model is in failure backoff across the cluster)")


def _refusal(model: str, spec: ModelSpec, decision: Wait | Failed | Full) -> errors.ModeldError:
    if isinstance(decision, Failed):
        return _error(decision)
    held = "; ".join(s.describe() for s in decision.held) if isinstance(decision, Full) else ""
    return errors.FailedPrecondition(
        f"model {model!r} already has max_replicas = {spec.max_replicas} replica(s) in the "
        f"cluster, running or starting ({held or decision}); unload one first or raise "
        "max_replicas"
    )
