"""This host's membership: register, renew, resync the view, reap, publish replicas.

One task per duty, each waiting on an event with a deadline:
- `_keep_alive`: every host_ttl/3 renew the host row (or register a new epoch when
  fenced), resync and take part in the leader election (election.py), in one
  statement: only the hosts whose version moved since the last resync, the leases
  running out, a count/epoch-sum check that sends the next round to a full reread
  when a host left unannounced, the follower's try of the leader lock or the
  leader's check that it still holds it (and its death check); a full reread after
  every (re)connect. Then reap one expired host. An idle host's one statement.
- LISTEN on the host's one link (link.py): a notification names a host, which
  `_reread` reads again; a reconnect forces a full resync.
- `_publish`: writes this host's replica rows, at once on a state change and at
  most once a second for load; computed from the router each time, so an event
  the lossy EventBus dropped is repaired on the next tick. It also writes this
  host's capacity (cluster/hostcap.py) into its host row: read at most once a
  second, written only when it changed.
A database failure marks the link down: the view is then trusted as it is (a
database outage is not a routing outage) and nobody is reaped until one host_ttl
after the link is back, because after an outage every host looks expired.
"""

import asyncio
import contextlib
import json
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from typing import Any

import asyncpg
import structlog

from modeld.clock import Clock
from modeld.cluster.election import Ballot, Election
from modeld.cluster.hostcap import worth_publishing
from modeld.cluster.link import DB_ERRORS, Link
from modeld.cluster.listing import view_events
from modeld.cluster.schema import CHANNEL, HOST_LOCK, host_key, migrate
from modeld.cluster.store import Changes, Fenced, PublishedRow, Snapshot, Store
from modeld.cluster.view import ClusterView, HostFigures, RemoteHost
from modeld.config import ClusterConfig, redact_dsn
from modeld.errors import Unavailable
from modeld.info import RemoteReplica
from modeld.ops.events import CLUSTER, EventBus
from modeld.ops.tasks import Spawn, detached
from modeld.state import ReplicaState

log = structlog.get_logger(__name__)
# Load figures are published at most this often; state changes at once.
LOAD_INTERVAL = 1.0
# An incremental resync reads the exact lease of hosts with under this fraction of
# host_ttl left; the others are known to last at least that long. Healthy hosts renew
# every host_ttl/3, so they stay out of it (and off `suspect`, under a quarter).
NEAR_FRACTION = 2 / 3
RowsFn = Callable[[], list[PublishedRow]]
FiguresFn = Callable[[], Awaitable[HostFigures]]


class Membership:
    def __init__(
        self,
        cfg: ClusterConfig,
        dsn: str,
        clock: Clock,
        events: EventBus,
        rows: RowsFn,
        *,
        figures: FiguresFn | None = None,
        spawn: Spawn = detached,
    ) -> None:
        # How every loop of the cluster starts (the daemon's supervisor: one that dies
        # turns health NOT_SERVING); the leader, specs and slots use it too.
        self.spawn = spawn
        self._cfg = cfg
        self._dsn = dsn
        self._clock = clock
        self._events = events
        self._rows = rows
        self._figures = figures
        self.view = ClusterView(cfg.host_id)
        self.epoch: int | None = None
        # Long enough for a loaded machine, short enough that a renewal still lands in time.
        self._timeout = max(min(cfg.host_ttl / 3, 5.0), 1.0)
        self.where = redact_dsn(dsn)
        self.link = Link(
            dsn, cfg.host_id, self._timeout, clock, self.where, prepare=self._prepare, spawn=spawn
        )
        self.link.listen(CHANNEL, self._notified)
        self.link.on_up(self._reconnected)
        self._store = Store(self.link, cfg.host_id, self._timeout)
        # After our link is back, expiry is not judged for one host_ttl plus the others'
        # longest reconnect wait: after an outage every host looks expired until it is back.
        self._grace = cfg.host_ttl + self.link.cap
        # Set after a (re)connect: the next resync reads everything.
        self._full = True
        # (monotonic time, highest host version) of the recent resyncs (`_since`).
        self._tops: list[tuple[float, int]] = []
        # Monotonic time of the last full resync that succeeded (None: none yet).
        self.resynced_at: float | None = None
        self._born = clock.monotonic()
        self._tick = asyncio.Event()
        self._publish_now = asyncio.Event()
        self._pending: set[str] = set()
        self._reread_wake = asyncio.Event()
        self._published: dict[str, PublishedRow] = {}
        self._changed = asyncio.Event()
        self._load_written = 0.0
        # The host row's capacity as last written, and when it was last read (at most
        # once a second: a reading is a worker-thread NVML call).
        self._figures_published: HostFigures | None = None
        self._figures_checked = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        # The leader lock's rounds, held in the heartbeat's (`take_part`).
        self._election: Election | None = None
        # Monotonic time of the last death check (leader.py polls when one is due).
        self._deaths_at = -math.inf

    # lifecycle

    async def start(self) -> None:
        """First contact; a newer schema refuses the start, an unreachable database does not
        (the link says so, and keeps trying)."""
        await self.link.start()
        for name, loop in (
            ("cluster-keepalive", self._keep_alive),
            ("cluster-reread", self._reread),
            ("cluster-publish", self._publish),
            ("cluster-events", self._follow_events),
        ):
            self._tasks.append(self.spawn(loop(), name))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.epoch is not None and self.link.up:
            with contextlib.suppress(*DB_ERRORS):
                await self._store.leave(self.epoch)
                log.info("cluster_left", host_id=self._cfg.host_id, epoch=self.epoch)
        await self.link.close()

    # the link to the database

    @property
    def registered(self) -> bool:
        return self.epoch is not None

    @property
    def up(self) -> bool:
        return self.link.up

    def trust_expired(self) -> bool:
        """True while host expiry cannot be judged: link down, or back for under one TTL."""
        return not self.link.up or self._clock.monotonic() - self.link.back_at < self._grace

    def others_back(self) -> bool:
        """True once every host cut off by the outage our link was in is back too: they
        retry at most `cap` apart, and relock their liveness lock before anything else."""
        since = self._clock.monotonic() - self.link.back_at
        return self.link.up and since >= self.link.cap + self._timeout

    def view_age(self) -> float:
        """Seconds since the view was last read in full (since start, before the first)."""
        since = self._born if self.resynced_at is None else self.resynced_at
        return self._clock.monotonic() - since

    def require(self, what: str) -> None:
        """Fail fast, without a round trip, when `what` needs the database and it is down."""
        if not self.link.up:
            raise Unavailable(
                f"{what} needs the cluster database ({self.where}), which is unreachable "
                f"({self.link.state().error}); routes to running replicas keep working"
            )

    async def _prepare(self, conn: asyncpg.Connection) -> None:
        """On each new connection, before anything else runs on it: the schema, and this
        host's liveness lock again (the old connection's went with it)."""
        await migrate(conn)
        if self.epoch is not None:
            await conn.execute(
                "SELECT pg_try_advisory_lock($1, $2)", HOST_LOCK, host_key(self.epoch)
            )

    def _reconnected(self) -> None:
        # Notifications sent while there was no connection are lost: read everything.
        self._full = True
        self._tick.set()

    async def _db(self, step: Callable[[Store], Awaitable[None]]) -> bool:
        try:
            await step(self._store)
        except Fenced as fenced:
            if fenced.epoch != self.epoch:
                # A write still under an epoch already replaced: old news, and
                # clearing the new epoch would register yet another one.
                return False
            log.warning("cluster_fenced", host_id=self._cfg.host_id, epoch=self.epoch)
            self.epoch = None
            self._tick.set()
            return False
        except asyncpg.PostgresError as exc:
            # A statement failed on a live connection (a timeout under load, say).
            log.warning("cluster_db_error", host_id=self._cfg.host_id, error=f"{exc}"[:200])
            return False
        except DB_ERRORS:
            return False  # the link says so, and reconnects
        return True

    # membership and the view

    def take_part(self, election: Election) -> None:
        """Hold `election`'s rounds in this host's heartbeat rounds (leader.py), from
        a round now on."""
        self._election = election
        self._tick.set()

    async def _keep_alive(self) -> None:
        interval = self._cfg.host_ttl / 3
        while True:
            await self.keep_alive_round()
            self._tick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tick.wait(), interval)

    async def keep_alive_round(self) -> None:
        """Renew, resync and vote, in one statement when idle; then reap one expired host."""
        voted = False
        if self.registered and not self._full:
            voted = await self._db(self._renew_and_resync)
        else:
            if self.registered:
                await self._db(self._heartbeat)
            if not self.registered:
                # First start, or fenced: a new epoch, and this host's replicas again.
                await self._db(self._register)
            await self._db(self._resync)
        if not voted and self._election is not None:
            # No vote in a heartbeat (or it failed): the election's own statements.
            await self._election.round(self.epoch, None)
        if self.link.up and self.registered:
            await self._db(self._reap)

    async def _register(self, store: Store) -> None:
        rows = self._rows()
        figures = await self._read_figures()
        self.epoch = await store.register(
            self._cfg.advertise,
            self._cfg.role,
            dict(self._cfg.labels),
            self._cfg.host_ttl,
            rows,
            figures=figures,
        )
        self._published = {row[0]: row for row in rows}
        self._figures_published = figures
        self._figures_checked = self._clock.monotonic()
        log.info(
            "cluster_registered", host_id=self._cfg.host_id, epoch=self.epoch, replicas=len(rows)
        )

    async def _heartbeat(self, store: Store) -> None:
        assert self.epoch is not None
        await store.heartbeat(self.epoch, self._cfg.host_ttl)

    async def _resync(self, store: Store) -> None:
        """Everything after a (re)connect; otherwise only what changed (`_incremental`)."""
        if not self._full:
            await self._incremental(await store.read_since(self._since(), self._near()))
            return
        full = await store.read(None)
        self._apply(full, None)
        self._full = False
        self._tops = [(self._clock.monotonic(), full.top)]
        self.resynced_at = self._clock.monotonic()

    async def _renew_and_resync(self, store: Store) -> None:
        epoch = self.epoch
        assert epoch is not None
        election = self._election
        ballot = None if election is None else election.ballot(epoch)
        # The leader's death check rides on its heartbeat (one poll of leader.py fewer).
        deaths = ballot is Ballot.HOLD and self.others_back()
        if deaths:
            self._deaths_at = self._clock.monotonic()
        renewed = await store.renew_and_read_since(
            epoch,
            self._cfg.host_ttl,
            self._since(),
            self._near(),
            ballot,
            name="" if election is None else election.session_name(epoch),
            deaths=deaths,
        )
        self._heard_dead(renewed.dead)
        await self._incremental(renewed.changes)
        if election is not None:
            await election.round(epoch, renewed.vote)

    async def _incremental(self, changes: Changes) -> None:
        now = self._clock.monotonic()
        if changes.changed:
            self._apply(changes.snapshot, changes.changed)
        self.view.refresh_expiry(changes.near, now, now + self._near())
        self._tops = [*self._tops[-8:], (now, changes.snapshot.top)]
        if (changes.count, changes.epochs) != self.view.shape():
            # A host left (its row deleted) and no notification said so: read it all.
            self._full = True
            self._tick.set()
        self.resynced_at = now

    def _near(self) -> float:
        return self._cfg.host_ttl * NEAR_FRACTION

    def _since(self) -> int:
        """The version from which to read: the newest top seen at least three timeouts ago,
        since a write that took its version before a read may commit after it."""
        lag = self._clock.monotonic() - 3 * self._timeout
        older = [top for at, top in self._tops if at <= lag]
        return older[-1] if older else self._tops[0][1] if self._tops else 0

    async def _reap(self, store: Store) -> None:
        now = self._clock.monotonic()
        if now - self.link.back_at < self._grace or not self.view.expired(now):
            return
        host = await store.reap_one()
        if host is not None:
            log.info("cluster_host_reaped", host_id=host)
            self._pending.add(host)
            self._reread_wake.set()

    def death_check_due(self, period: float) -> float:
        """Seconds until `period` has passed since the last death check (<= 0: due)."""
        return self._deaths_at + period - self._clock.monotonic()

    async def mark_dead(self) -> None:
        """End the leases of hosts whose process is gone (leader.py runs it)."""
        self._deaths_at = self._clock.monotonic()
        try:
            dead = await self._store.mark_dead()
        except DB_ERRORS:
            return  # the link says so; the next poll retries
        self._heard_dead(dead)

    def _heard_dead(self, dead: list[str]) -> None:
        for host in dead:
            log.warning("cluster_host_dead", host_id=host, reason="its database session ended")
            self._pending.add(host)
        if dead:
            self._reread_wake.set()

    def _apply(self, snap: Snapshot, host_ids: Sequence[str] | None) -> None:
        now = self._clock.monotonic()
        hosts = [_host(h, now) for h in snap.hosts]
        replicas = [_replica(r) for r in snap.replicas]
        before, replicas_before = self._shape(), dict(self.view.replicas)
        seen = {h.host_id: h.figures for h in self.view.hosts.values()}
        was_alive = {h.host_id for h in self.view.hosts.values() if h.expires > now and not h.gone}
        if host_ids is None:
            self.view.replace_all(hosts, replicas)
        else:
            by_id = {h.host_id: h for h in hosts}
            for host_id in host_ids:
                mine = [r for r in replicas if r.host_id == host_id]
                self.view.replace_host(host_id, by_id.get(host_id), mine)
        after = self._shape()
        if after != before:
            wall = self._clock.wall()
            changes = view_events(
                replicas_before, self.view.replicas, self.view.hosts, self._cfg.host_id, wall
            )
            for event in changes:
                self._events.publish(event)
            self._changed.set()
            self._changed = asyncio.Event()
            log.info(
                "cluster_view_changed",
                hosts={h.host_id: h.epoch for h in self.view.hosts.values()},
                ready=sorted(
                    f"{r.host_id}/{r.id}"
                    for r in self.view.replicas.values()
                    if r.state is ReplicaState.READY
                ),
            )
        for host in hosts:
            if host.host_id in was_alive and (host.expires <= now or host.gone):
                log.info("cluster_host_expired", host_id=host.host_id, epoch=host.epoch)
            if seen.get(host.host_id) != host.figures:
                log.debug("cluster_capacity_seen", host_id=host.host_id, **asdict(host.figures))

    def changed(self) -> asyncio.Event:
        """Set at the next change of the view's shape; take it before reading the view."""
        return self._changed

    def adopt(self, row: PublishedRow) -> None:
        """`row` was written by a claim-fenced publish (claims.bind): it is published,
        so that its removal is published too."""
        self._published[row[0]] = row

    def _shape(self) -> tuple[frozenset[tuple[str, int]], frozenset[tuple[str, str, str, int]]]:
        """What a view change is: hosts and epochs, replicas and states (not load)."""
        return (
            frozenset((h.host_id, h.epoch) for h in self.view.hosts.values()),
            frozenset(
                (r.host_id, r.id, r.state.value, r.generation) for r in self.view.replicas.values()
            ),
        )

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload != self._cfg.host_id:
            self._pending.add(payload)
            self._reread_wake.set()

    async def _reread(self) -> None:
        while True:
            await self._reread_wake.wait()
            self._reread_wake.clear()
            hosts, self._pending = sorted(self._pending), set()

            async def step(store: Store, hosts: list[str] = hosts) -> None:
                self._apply(await store.read(hosts), hosts)

            # On failure, the resync once the link is back covers these hosts.
            await self._db(step)

    # publishing this host's replicas

    async def _follow_events(self) -> None:
        subscription = self._events.subscribe()
        try:
            async for event in subscription:
                # Other hosts' changes (published by _apply) change nothing to publish.
                if event.kind != CLUSTER:
                    self._publish_now.set()
        finally:
            subscription.close()

    async def _publish(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._publish_now.wait(), LOAD_INTERVAL)
            self._publish_now.clear()
            if self.epoch is None or not self.link.up:
                continue
            await self._publish_figures()
            rows, gone, urgent = self._diff()
            now = self._clock.monotonic()
            if not (rows or gone) or (not urgent and now - self._load_written < LOAD_INTERVAL):
                continue

            async def step(
                store: Store, rows: list[PublishedRow] = rows, gone: list[str] = gone
            ) -> None:
                assert self.epoch is not None
                await store.publish(self.epoch, rows, gone)

            if await self._db(step):
                self._load_written = now
                for row in rows:
                    self._published[row[0]] = row
                for rid in gone:
                    self._published.pop(rid, None)

    async def _read_figures(self) -> HostFigures | None:
        return await self._figures() if self._figures is not None else None

    async def _publish_figures(self) -> None:
        """The host row's capacity: read at most once a second, written when it changed."""
        now = self._clock.monotonic()
        if self._figures is None or now - self._figures_checked < LOAD_INTERVAL:
            return
        self._figures_checked = now
        figures = await self._figures()
        if not worth_publishing(figures, self._figures_published):
            return

        async def step(store: Store) -> None:
            assert self.epoch is not None
            await store.publish_host(self.epoch, figures)

        if await self._db(step):
            self._figures_published = figures

    def _diff(self) -> tuple[list[PublishedRow], list[str], bool]:
        """Rows that changed since last written, ids gone, and whether identity changed."""
        current = {row[0]: row for row in self._rows()}
        changed = [row for rid, row in current.items() if self._published.get(rid) != row]
        gone = [rid for rid in self._published if rid not in current]
        urgent = bool(gone) or any(
            self._published.get(row[0], ())[:5] != row[:5] for row in changed
        )
        return changed, gone, urgent


def _host(data: dict[str, Any], now: float) -> RemoteHost:
    labels = data.get("labels") or {}
    return RemoteHost(
        host_id=data["host_id"],
        epoch=int(data["epoch"]),
        address=data["address"],
        role=data["role"],
        labels=labels if isinstance(labels, dict) else json.loads(labels),
        expires=now + float(data["remaining"]),
        gone=bool(data.get("gone")),
        figures=HostFigures(
            backends=tuple(data.get("backends") or ()),
            gpu_free=tuple(int(b) for b in data.get("gpu_free") or ()),
            gpu_total=tuple(int(b) for b in data.get("gpu_total") or ()),
            ram_free=int(data.get("ram_free") or 0),
            ram_total=int(data.get("ram_total") or 0),
            loaded=int(data.get("loaded") or 0),
            max_loaded=int(data.get("max_loaded") or 0),
            evictable=int(data.get("evictable") or 0),
        ),
    )


def _replica(data: dict[str, Any]) -> RemoteReplica:
    return RemoteReplica(
        id=data["id"],
        host_id=data["host_id"],
        epoch=int(data["epoch"]),
        model=data["model"],
        state=ReplicaState(data["state"]),
        address=data["address"],
        generation=int(data["generation"]),
        in_flight=int(data["in_flight"]),
        last_used=float(data["last_used"]),
        free_memory=int(data["free_memory"]),
    )
