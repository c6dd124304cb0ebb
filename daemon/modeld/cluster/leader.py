"""One leader for the cluster, and what it does: keep every model's min_replicas up.

Who leads is settled by the leader lock (election.py), in every host's heartbeat
round (membership.py); after each round the leader tops min_replicas up. The
leader also watches for dead hosts (`_watch_deaths`, below).

min_replicas. In cluster mode it counts the whole cluster, and only the leader
tops it up (hosts do not keep it locally; server.py). Each round the leader counts
the STARTING..READY replicas of every model it knows on hosts whose lease is
current, asks policy/cluster_replicas.py where the missing ones go, and sends
`Load{model, replicas, host}` to those hosts (forwarded; to itself too). A model
with a Load in flight is not planned again until it ends; a host that refused or
failed a Load of a model is skipped for that model for a while; a Load to a host
that leaves the cluster is cancelled. While the database link is down, or back
for under one host_ttl, the view cannot tell dead hosts from live ones, and the
leader starts nothing.
"""

import asyncio

import structlog

from modeld.clock import Clock
from modeld.cluster.election import Election
from modeld.cluster.forward import Load, Peers
from modeld.cluster.hostcap import capacities
from modeld.cluster.membership import Membership
from modeld.errors import ModeldError
from modeld.policy.cluster_replicas import Counted, Start, plan
from modeld.state import ReplicaState
from modeld.storage.catalog import Catalog

log = structlog.get_logger(__name__)
# How long a host that refused or failed a Load of a model is not asked again for it.
REFUSED_FOR = 30.0
# How long the leader counts a replica its Load returned before the view shows it.
LOADED_GRACE = 10.0
LOAD_WAIT = 600.0
# How often the leader looks for hosts whose process is gone (their liveness lock is
# free): one cheap statement for the whole cluster, so a kill -9 is seen within this.
# The leader's heartbeat carries one too (membership.py), and stands for a poll.
DEATH_POLL_S = 0.5


class Leader:
    """Takes part in the election (in the heartbeat rounds); while leading, tops up
    min_replicas after each round and watches for dead hosts."""

    def __init__(
        self,
        *,
        host_id: str,
        clock: Clock,
        membership: Membership,
        catalog: Catalog,
        peers: Peers,
        timeout: float,
        placement: str,
    ) -> None:
        self.election = Election(membership.link, host_id, timeout, after=self._after_round)
        self._placement = placement
        self._clock = clock
        self._membership = membership
        self._catalog = catalog
        self._peers = peers
        # (model, host) -> the Load this leader sent and is waiting for.
        self._loads: dict[tuple[str, str], asyncio.Task[None]] = {}
        # (model, host) -> monotonic time until which that host is not asked again.
        self._refused: dict[tuple[str, str], float] = {}
        # replica id -> a replica a Load returned, counted until the view shows it.
        self._loaded: dict[str, tuple[Counted, float]] = {}
        self._unplaceable: dict[str, str] = {}
        self._deaths: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._membership.take_part(self.election)
        self._deaths = self._membership.spawn(self._watch_deaths(), "cluster-deaths")

    async def close(self) -> None:
        if self._deaths is not None:
            self._deaths.cancel()
            await asyncio.gather(self._deaths, return_exceptions=True)
        await self.election.close()
        self._cancel_loads()

    def _after_round(self, leads: bool) -> None:
        """After each round of the election (in the membership's heartbeat task)."""
        try:
            if leads:
                self.keep_min_replicas()
            else:
                self._cancel_loads()
        except Exception:
            log.exception("leader_round_failed")

    async def _watch_deaths(self) -> None:
        """While leading: end the leases of hosts whose connection closed, at least every
        DEATH_POLL_S (a heartbeat's check counts). Not while this host's own link is fresh
        (the others may not have reconnected, and relocked, yet)."""
        while True:
            due = self._membership.death_check_due(DEATH_POLL_S)
            if due > 0 or self.election.leading is None or not self._membership.others_back():
                # The poll period, not a synchronisation.
                await asyncio.sleep(due if due > 0 else DEATH_POLL_S)
                continue
            try:
                await self._membership.mark_dead()
            except Exception:
                log.exception("cluster_death_check_failed")

    def keep_min_replicas(self) -> None:
        """One round: count, plan, send the Loads (they run on their own)."""
        if self._membership.trust_expired():
            return  # dead hosts cannot be told from live ones now
        view = self._membership.view
        now = self._clock.monotonic()
        alive = {h for h in view.hosts if view.alive(h, now, trust_expired=False)}
        self._forget(now, alive)
        counted = {
            r.id: Counted(r.model, r.host_id, r.state)
            for r in view.replicas.values()
            if r.host_id in alive
        }
        for replica_id, (replica, _) in self._loaded.items():
            if replica.host_id in alive:
                counted.setdefault(replica_id, replica)
        refused: dict[str, set[str]] = {}
        for model, host_id in self._refused:
            refused.setdefault(model, set()).add(host_id)
        decided = plan(
            self._catalog.list(),
            counted.values(),
            capacities(view, now, trust_expired=False),
            busy={model for model, _ in self._loads},
            refused=refused,
            default_mode=self._placement,
        )
        if decided.unplaceable != self._unplaceable:
            for model, why in decided.unplaceable.items():
                log.warning("min_replicas_unplaceable", model=model, reason=why)
            self._unplaceable = dict(decided.unplaceable)
        for start in decided.starts:
            self._send(start, view.hosts[start.host_id].address)

    def _forget(self, now: float, alive: set[str]) -> None:
        """Drop what is over: refusals and grace periods past, Loads to hosts gone."""
        self._refused = {k: until for k, until in self._refused.items() if until > now}
        self._loaded = {k: v for k, v in self._loaded.items() if v[1] > now}
        for (model, host_id), task in list(self._loads.items()):
            if host_id not in alive:
                log.info("min_replicas_load_abandoned", model=model, host_id=host_id)
                task.cancel()

    def _send(self, start: Start, address: str) -> None:
        log.info(
            "min_replicas_start", model=start.model, host_id=start.host_id, replicas=start.replicas
        )
        key = (start.model, start.host_id)
        self._loads[key] = asyncio.create_task(self._load(start, address))

    async def _load(self, start: Start, address: str) -> None:
        key = (start.model, start.host_id)
        request = Load(start.model, start.replicas, start.host_id, address)
        try:
            loaded = await self._peers.load(request, LOAD_WAIT)
        except ModeldError as exc:
            self._refused[key] = self._clock.monotonic() + REFUSED_FOR
            log.warning(
                "min_replicas_load_failed", model=start.model, host_id=start.host_id, error=str(exc)
            )
            return
        finally:
            if self._loads.get(key) is asyncio.current_task():
                del self._loads[key]
        until = self._clock.monotonic() + LOADED_GRACE
        for replica in loaded:
            counted = Counted(start.model, start.host_id, ReplicaState.READY)
            self._loaded[replica.id] = (counted, until)

    def _cancel_loads(self) -> None:
        for task in self._loads.values():
            task.cancel()
        self._loads.clear()
