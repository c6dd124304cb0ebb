"""`ClusterRouter`: the one interface the servicer calls in cluster mode.

Route: the least-loaded local READY replica, unless the best remote READY replica
of the view (same policy, by its estimated in-flight) has fewer in-flight than it
(`policy/cluster_route.py`, the spill rule): then the Route is forwarded to that
replica's owner, which leases from its own memory; a failed or stale owner means
another replica, at most MAX_FORWARDS, and then the local one. With no READY
replica anywhere, the model is started through its claim (`coldstart.py`): once
for the whole cluster, on the host placement picks, and the Route is routed
again. A Route with an affinity key goes where the bounded-load ring over local
and remote READY replicas together puts it (`cluster_route.affine_target`), and the owner's
own ring picks among its replicas. Lease ids are `host_id~id`, so Release and
RenewLease reach the owner from any modeld. A Load on this host takes one of the
model's max_replicas slots per replica it starts (a forwarded Load that carries a
claim starts one replica under it).

It also holds the cluster's leader (election.py: who leads, settled in the
heartbeat rounds; leader.py: min_replicas across the cluster) and its shared model
specs (specs.py: PutModel/DeleteModel).
"""

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path

import structlog

from modeld.clock import Clock
from modeld.cluster.claims import ClaimStore, claim_of
from modeld.cluster.coldstart import CLAIM_TTL_HOSTS, ColdStarts
from modeld.cluster.counters import ClusterCounters
from modeld.cluster.forward import (
    Load,
    PeerFailed,
    Peers,
)
from modeld.cluster.leader import Leader
from modeld.cluster.listing import Here, host_replica_counts, host_state_counts, list_hosts
from modeld.cluster.marker import Marker, marker_of, parse
from modeld.cluster.membership import FiguresFn, Membership
from modeld.cluster.ownload import OwnLoad
from modeld.cluster.slotgate import SlotGate
from modeld.cluster.specs import SharedSpecs
from modeld.cluster.store import PublishedRow, published
from modeld.cluster.view import RemoteHost
from modeld.config import Config
from modeld.errors import ConfigError, FailedPrecondition, NotFound, RetryRoute, Unavailable
from modeld.info import Grant, HostEntry, LinkState, Listing, RemoteReplica, ReplicaInfo
from modeld.ops.events import EventBus
from modeld.ops.metrics import ClusterStats
from modeld.ops.tasks import Spawn, detached
from modeld.policy.cluster_route import affine_target, route_target
from modeld.routing.leases import Lease
from modeld.routing.lifecycle import ScaleUps
from modeld.routing.pool import ModelPool
from modeld.routing.rings import Rings
from modeld.routing.routed import routable
from modeld.routing.router import Router
from modeld.spec import ModelSpec
from modeld.state import LIVE
from modeld.storage.catalog import Catalog

log = structlog.get_logger(__name__)
MAX_FORWARDS = 3
SEP = "~"
# A Route starts its model this many times at most, routing again after each (a replica
# that was published but could not be reached), then answers RetryRoute.
COLD_ROUTES = 3
# How long a Route that finds no replica while the database link is down waits for it
# to come back (a flap, a restart) before answering UNAVAILABLE: the replica it needs
# may just have been loaded elsewhere, its notification not yet here.
LINK_WAIT_S = 1.0


class ClusterRouter:
    def __init__(
        self,
        config: Config,
        router: Router,
        clock: Clock,
        events: EventBus,
        *,
        catalog: Catalog,
        figures: FiguresFn | None = None,
        spawn: Spawn = detached,
        scale_ups: ScaleUps,
    ) -> None:
        cfg = config.cluster
        assert cfg is not None
        self._cfg = cfg
        self._router = router
        self._clock = clock
        self.peers = Peers(config)
        dsn = _dsn(cfg.dsn, cfg.dsn_file)
        self.membership = Membership(
            cfg, dsn, clock, events, self.rows, figures=figures, spawn=spawn
        )
        self.membership.view.on_leave = self._host_left
        self._own = OwnLoad()
        # model -> the affinity ring over local and remote READY replicas together.
        self._rings = Rings()
        self.counters = ClusterCounters()
        self._forward_cap = max(1.0, min(5.0, cfg.host_ttl))
        # As the membership's: every round fits in one host_ttl/3.
        self._db_timeout = max(min(cfg.host_ttl / 3, 5.0), 1.0)
        self.specs, self.leader = self._shared(catalog)
        self._cold, self._slots = self._starts(catalog, scale_ups)

    def _shared(self, catalog: Catalog) -> tuple[SharedSpecs, Leader]:
        """The cluster's model specs, and its leader (min_replicas)."""
        cfg = self._cfg
        specs = SharedSpecs(
            host_id=cfg.host_id,
            catalog=catalog,
            membership=self.membership,
            interval=cfg.host_ttl / 3,
            timeout=self._db_timeout,
        )
        leader = Leader(
            host_id=cfg.host_id,
            clock=self._clock,
            membership=self.membership,
            catalog=catalog,
            peers=self.peers,
            timeout=self._db_timeout,
            placement=cfg.placement,
        )
        return specs, leader

    def _starts(self, catalog: Catalog, scale_ups: ScaleUps) -> tuple[ColdStarts, SlotGate]:
        """Starts under cluster-wide slots: cold Routes', and (the gate) every scale-up
        of this host's router, placed cluster-wide."""
        cfg = self._cfg
        claims = ClaimStore(self.membership.link, cfg.host_id, self._db_timeout)
        cold = ColdStarts(
            host_id=cfg.host_id,
            host_ttl=cfg.host_ttl,
            placement=cfg.placement,
            router=self._router,
            catalog=catalog,
            membership=self.membership,
            peers=self.peers,
            claims=claims,
            clock=self._clock,
            counters=self.counters,
            row_of=self._row_of,
        )
        slots = SlotGate(
            cold=cold,
            claims=claims,
            membership=self.membership,
            router=self._router,
            catalog=catalog,
            clock=self._clock,
            claim_ttl=cfg.host_ttl * CLAIM_TTL_HOSTS,
            period=cfg.host_ttl / 3,
            requests=scale_ups,
        )
        return cold, slots

    async def start(self) -> None:
        await self.membership.start()
        await self.specs.start()
        await self.leader.start()
        self._slots.start()

    async def close(self) -> None:
        await self._slots.close()
        await self._cold.close()
        await self.leader.close()
        await self.specs.close()
        await self.membership.close()
        await self.peers.close()

    def _host_left(self, host: RemoteHost) -> None:
        # Another host may have taken over the address (a restart on the same port).
        if all(h.address != host.address for h in self.membership.view.hosts.values()):
            if host.address in self.peers.addresses():
                log.info("cluster_peer_closed", host_id=host.host_id, address=host.address)
            self.peers.forget(host.address)

    @property
    def host_id(self) -> str:
        return self._cfg.host_id

    # what this host publishes

    def rows(self) -> list[PublishedRow]:
        return self._rows(lambda info: info.state in LIVE and self._cold.visible(info))

    def _row_of(self, replica_id: str) -> PublishedRow | None:
        return next(iter(self._rows(lambda info: info.id == replica_id)), None)

    def _rows(self, which: Callable[[ReplicaInfo], bool]) -> list[PublishedRow]:
        free = self._router.index.free_memory
        return [published(info, free) for info in self._router.replicas(None) if which(info)]

    # listings: ListHosts, ListReplicas, metrics

    def hosts(self) -> list[HostEntry]:
        live = sum(1 for i in self._router.replicas(None) if i.state in LIVE)
        here = Here(self.host_id, self._cfg.advertise, self._cfg.role, dict(self._cfg.labels), live)
        return list_hosts(
            self.membership.view,
            self._clock.monotonic(),
            self._cfg.host_ttl,
            trust_expired=self.membership.trust_expired(),
            here=here,
        )

    def link_state(self) -> LinkState:
        return self.membership.link.state()

    def replicas(self, model: str | None, *, local: bool) -> Listing:
        """This host's replicas from its router, then (unless `local`) other hosts'
        from the view."""
        mine = [dataclasses.replace(i, host_id=self.host_id) for i in self._router.replicas(model)]
        if local:
            return Listing(mine, [])
        others = sorted(
            (
                r
                for r in self.membership.view.replicas.values()
                if r.host_id != self.host_id and (model is None or r.model == model)
            ),
            key=lambda r: (r.model, r.id),
        )
        return Listing(mine + [r.listed() for r in others], [])

    def stats(self) -> ClusterStats:
        """What the cluster metrics read at scrape time."""
        link = self.membership.link
        return ClusterStats(
            counters={**dataclasses.asdict(self.counters), **link.counts()},
            view_age=self.membership.view_age(),
            host_replicas=host_replica_counts(self.membership.view),
            hosts=host_state_counts(self.hosts()),
            db_connections=int(link.up),
        )

    # Route

    def route_now(self, model: str, key: str, forwarded: str) -> Grant | None:
        """At once only as the owner of a Route forwarded over a RouteStream, with room
        on a replica now (RouteStream then answers it inline); any other Route may
        forward, or start through the database."""
        if not forwarded:
            return None
        pool, declined = self._owner_check(model, parse(forwarded))
        if declined is not None:
            return declined
        lease = self._router.route_now(model, key)
        return None if lease is None else self._owner_grant(pool, lease)

    async def route(self, model: str, deadline: float, key: str, forwarded: str) -> Grant:
        """`key`: the affinity key; the replica on a host is picked by that host's ring."""
        marker = marker_of(forwarded)
        if marker is not None:
            return await self._route_as_owner(model, marker, deadline, key)
        for starts in range(COLD_ROUTES + 1):
            grant = await self._route_warm(model, deadline, key)
            if grant is not None:
                return grant._replace(cold_start=True) if starts else grant
            if starts < COLD_ROUTES:
                await self._start_here(model, deadline)
        raise RetryRoute(
            f"model {model!r}: its replica started but could not be reached; retry the Route"
        )

    async def _route_warm(self, model: str, deadline: float, key: str) -> Grant | None:
        """A READY replica's lease, here or forwarded; None when there is none anywhere."""
        tried: list[str] = []
        for _ in range(MAX_FORWARDS):
            # Read again after each failed forward: other Routes went on meanwhile.
            local = self._local_in_flight(model)
            candidates = self.membership.view.candidates(
                model,
                self._clock.monotonic(),
                trust_expired=self.membership.trust_expired(),
                exclude=tried,
            )
            extra = self._own.extra(candidates)
            if key:
                chosen = self._affine(model, key, candidates, extra)
                # The owner must not decline: the key, not the load, chose its replica.
                bound = None
            else:
                chosen = route_target(local, candidates, extra)
                bound = local
            if chosen is None:
                break
            tried.append(chosen.id)
            reply = await self._forward(model, chosen, bound, deadline, key)
            if reply is not None:
                return reply
        if self._local_in_flight(model) is not None:
            return self._response(await self._router.route(model, deadline, key))
        return None

    async def _forward(
        self, model: str, chosen: RemoteReplica, local: int | None, deadline: float, key: str
    ) -> Grant | None:
        """The Route forwarded to `chosen`'s owner, bounded by the local replica's
        in-flight when there is one; None when it should go elsewhere."""
        host = self.membership.view.hosts[chosen.host_id]
        timeout = min(deadline - self._clock.monotonic(), self._forward_cap)
        self.counters.forwards += 1
        self._own.begin(chosen)
        try:
            reply = await self.peers.route(
                host.host_id,
                host.address,
                model,
                Marker(chosen.id, chosen.generation, local).encode(),
                max(timeout, 0.001),
                key=key,
            )
        except PeerFailed as exc:
            self.counters.forward_retries += 1
            log.info("cluster_forward_retry", model=model, replica_id=chosen.id, error=str(exc))
            return None
        finally:
            self._own.end(chosen)
        row = self.membership.view.replicas.get(reply.replica_id)
        if not reply.declined:
            self._own.granted(row, reply.lease_id)
        self._own.observed(row, reply.owner_in_flight)
        return None if reply.declined else reply

    def _affine(
        self, model: str, key: str, candidates: list[RemoteReplica], extra: dict[str, int]
    ) -> RemoteReplica | None:
        """The remote replica an affinity key goes to; None: a local one (or none at all,
        then the spill rule's choice without a local replica)."""
        local = self._local_loads(model)
        ring = self._rings.ring(model, [*local, *(r.id for r in candidates)])
        slack = self._router.affinity_slack
        chosen = affine_target(
            ring, key, local=local, candidates=candidates, extra=extra, slack=slack
        )
        if chosen is None and not local:
            return route_target(None, candidates, extra)
        return chosen

    def _local_loads(self, model: str) -> dict[str, int]:
        """Local READY replicas' in-flight by id."""
        pool = self._router.index.existing(model)
        return {r.id: r.in_flight for r in pool.ready()} if pool is not None else {}

    def _local_in_flight(self, model: str) -> int | None:
        """The least-loaded local READY replica's in-flight (what the local pick takes),
        None without one. A local Route leases without awaiting, so this is exact."""
        pool = self._router.index.existing(model)
        if pool is None:
            return None
        return min((r.in_flight for r in pool.ready()), default=None)

    async def _route_as_owner(self, model: str, marker: Marker, deadline: float, key: str) -> Grant:
        pool, declined = self._owner_check(model, marker)
        if declined is not None:
            return declined
        # No deadline travels on a RouteStream message: the forwarder waits this long.
        deadline = min(deadline, self._clock.monotonic() + self._forward_cap)
        return self._owner_grant(pool, await self._router.route(model, deadline, key))

    def _owner_check(self, model: str, marker: Marker) -> tuple[ModelPool, Grant | None]:
        """The model's pool, and the declined answer when the forwarder's replica is not
        less loaded than its bound; NotFound when the marker names no routable replica."""
        replica_id, generation, below = marker.replica, marker.gen, marker.below
        pool = self._router.index.existing(model)
        current = pool.replicas.get(replica_id) if pool is not None else None
        if (
            pool is None
            or current is None
            or not routable(current)
            or current.restarts != generation
        ):
            # The forwarder's view is stale (stopped, or restarted under another
            # generation, maybe on a reused address): it must pick another replica.
            raise NotFound(
                f"replica {replica_id[:64]!r} generation {generation} of model {model!r} "
                f"is not ready on host {self.host_id}; route elsewhere"
            )
        if below is not None and current.in_flight >= below:
            # The forwarder's estimate was low: its own replica is no busier than this one.
            return pool, Grant(
                "", replica_id, "", "grpc", 0.0, owner_in_flight=current.in_flight, declined=True
            )
        return pool, None

    def _owner_grant(self, pool: ModelPool, lease: Lease) -> Grant:
        reply = self._response(lease)
        granted = pool.replicas.get(reply.replica_id)
        return reply._replace(owner_in_flight=granted.in_flight if granted is not None else 0)

    async def _start_here(self, model: str, deadline: float) -> None:
        """No READY replica anywhere: start it through its claim (the Route goes on)."""
        if not self.membership.up:
            wait = min(LINK_WAIT_S, deadline - self._clock.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.membership.link.wait_up(), max(wait, 0.0))
        self.membership.require(f"starting model {model!r}")
        await self._cold.ensure(model, deadline)

    def _response(self, lease: Lease) -> Grant:
        return lease.grant()._replace(
            lease_id=f"{self.host_id}{SEP}{lease.id}", owner_address=self._cfg.advertise
        )

    # leases held elsewhere

    def release_now(self, lease_id: str, outcome: str) -> bool | None:
        """At once when the lease is this host's (a forwarded Release on a RouteStream
        is answered inline); None when another host may hold it."""
        owner, sep, inner = lease_id.partition(SEP)
        if not sep or owner == self.host_id:
            return self._router.release(inner if sep else lease_id, outcome)
        return None

    async def release(self, lease_id: str, outcome: str, forwarded: str) -> bool:
        here = self.release_now(lease_id, outcome)
        if here is not None:
            return here
        owner = lease_id.partition(SEP)[0]
        host = self.membership.view.hosts.get(owner)
        if host is None or forwarded:
            # Its host left the cluster (or was reaped): its leases ended with it.
            return False
        try:
            released = await self.peers.release(
                owner, host.address, lease_id, outcome, self._forward_cap
            )
        except Unavailable as exc:
            log.info("cluster_release_unreachable", host_id=owner, error=str(exc))
            return False
        if released:
            self._own.released(lease_id, self._replica_of(lease_id))
        return released

    def _replica_of(self, lease_id: str) -> RemoteReplica | None:
        row = self._own.row_of(lease_id)
        return self.membership.view.replicas.get(row.id) if row is not None else None

    def renew_now(self, lease_id: str) -> float | None:
        """As `release_now`: at once for this host's own lease."""
        owner, sep, inner = lease_id.partition(SEP)
        if not sep or owner == self.host_id:
            return self._router.renew(inner if sep else lease_id)
        return None

    async def renew(self, lease_id: str, forwarded: str) -> float:
        here = self.renew_now(lease_id)
        if here is not None:
            return here
        owner = lease_id.partition(SEP)[0]
        host = self.membership.view.hosts.get(owner)
        if host is None or forwarded:
            raise NotFound(
                f"lease {lease_id[:80]!r}: its host {owner[:64]!r} is not in the "
                "cluster, and its leases ended with it; Route again"
            )
        return await self.peers.renew(owner, host.address, lease_id, self._forward_cap)

    # Load

    async def load(
        self, model: str, replicas: int, host: str, deadline: float, forwarded: str
    ) -> list[ReplicaInfo]:
        target = host or self.host_id
        if target != self.host_id:
            peer = self.membership.view.hosts.get(target)
            if forwarded or peer is None:
                raise NotFound(f"host {target[:64]!r} is not in the cluster")
            timeout = max(deadline - self._clock.monotonic(), 0.001)
            return await self.peers.load(Load(model, replicas, target, peer.address), timeout)
        if self._cfg.role == "router":
            raise FailedPrecondition(
                f"host {self.host_id} is a router (cluster.role = router) and runs no backends; "
                "name a node in Load.host"
            )
        self.membership.require(f"loading model {model!r}")
        claim = claim_of(model, marker_of(forwarded))
        if claim is not None:
            return await self._cold.load_claimed(model, [claim], deadline)
        return await self._cold.load_here(model, replicas, deadline)

    # model specs, shared by the cluster

    async def put_model(self, spec: ModelSpec) -> ModelSpec:
        return await self.specs.put(spec)

    async def delete_model(self, name: str) -> bool:
        # This host's own replicas were checked from the router's memory (servicer).
        hosts = sorted(
            {
                r.host_id
                for r in self.membership.view.replicas.values()
                if r.model == name and r.host_id != self.host_id
            }
        )
        if hosts:
            raise FailedPrecondition(
                f"model {name!r} has running replicas on host(s) {', '.join(hosts)}; "
                "Unload it there first"
            )
        return await self.specs.delete(name)


def _dsn(dsn: str, dsn_file: str) -> str:
    if dsn:
        return dsn
    try:
        text = Path(dsn_file).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cluster.dsn_file {dsn_file}: {exc.strerror}") from None
    if not text:
        raise ConfigError(f"cluster.dsn_file {dsn_file}: empty")
    return text
