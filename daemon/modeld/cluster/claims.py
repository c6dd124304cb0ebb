"""Claims: who may start a replica of a model, kept in PostgreSQL (`modeld_claims`).

A model has `max_replicas` slots; a start first takes a free slot, so no path
exceeds max_replicas across the cluster, and a cold Route waits on a slot that is
loading instead of taking another one, so a cold model starts once. A row is:
- loading: its owner renews `expires_at` (database clock) while the load goes on;
  once it has expired anyone may take it over under a new `claim_id`;
- serving: the replica it became; the slot is free again once that replica's row
  is gone (stopped, or its host reaped);
- failed: the error every waiter gets, until `expires_at` (the cluster-wide backoff).
Each statement is one short transaction; nothing is held across a load. A replica
is published as serving only if its claim id still holds (`bind`), so a load
whose claim was taken over can never publish.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from modeld.cluster.link import DB_ERRORS, Link
from modeld.cluster.marker import Marker
from modeld.cluster.schema import CHANNEL
from modeld.cluster.store import REPLICA_COLUMNS, REPLICA_CONFLICT, PublishedRow
from modeld.errors import Unavailable

LOADING, SERVING, FAILED = "loading", "serving", "failed"
# First key of the per-model transaction lock that orders the takes of one model.
CLAIM_LOCK = 0x6D6F6463

# A serving slot is held by its replica's row while that row's host is live: a dead
# host's replicas free their slots when its lease expires, not only once it is reaped.
_HELD_BY = """
    modeld_replicas r JOIN modeld_hosts h
    ON h.host_id = r.host_id AND h.epoch = r.epoch AND h.lease_expires_at > now()
"""
_SLOTS = f"""
SELECT c.slot, c.claim_id, c.owner_host, c.state, c.expires_at > now() AS live,
       r.state AS replica_state, c.error, c.code
FROM modeld_claims c LEFT JOIN ({_HELD_BY}) ON r.replica_id = c.replica_id
WHERE c.model = $1
"""
# The guard that makes a take safe on its own: only a free slot is taken.
_FREE = f"""
WHERE (modeld_claims.state <> 'serving' AND modeld_claims.expires_at <= now())
   OR (modeld_claims.state = 'serving' AND NOT EXISTS (
        SELECT 1 FROM {_HELD_BY} WHERE r.replica_id = modeld_claims.replica_id))
"""
_TAKE = f"""
INSERT INTO modeld_claims (model, slot, claim_id, owner_host, state, expires_at)
VALUES ($1, $2, nextval('modeld_claim_id'), $3, 'loading', now() + make_interval(secs => $4))
ON CONFLICT (model, slot) DO UPDATE SET
    claim_id = EXCLUDED.claim_id, owner_host = EXCLUDED.owner_host, state = 'loading',
    expires_at = EXCLUDED.expires_at, replica_id = NULL, error = '', code = ''
{_FREE}
RETURNING claim_id
"""
# A replica that runs already (its host is back under a new epoch) takes a free slot
# as serving at once: there is no load to fence.
_ADOPT = f"""
INSERT INTO modeld_claims (model, slot, claim_id, owner_host, state, expires_at, replica_id)
VALUES ($1, $2, nextval('modeld_claim_id'), $3, 'serving', now(), $4)
ON CONFLICT (model, slot) DO UPDATE SET
    claim_id = EXCLUDED.claim_id, owner_host = EXCLUDED.owner_host, state = 'serving',
    expires_at = EXCLUDED.expires_at, replica_id = EXCLUDED.replica_id, error = '', code = ''
{_FREE}
RETURNING claim_id
"""
# One statement (one round trip, one transaction): the claim becomes serving only if
# its id still holds and this host's epoch is live, and the replica row is written
# and announced only then. Parameters: model, slot, claim id, then the PublishedRow
# fields ($4..$11), host id, epoch.
_BIND = f"""
WITH bound AS (
    UPDATE modeld_claims SET state = 'serving', replica_id = $4, failures = 0,
        error = '', code = ''
    WHERE model = $1 AND slot = $2 AND claim_id = $3 AND state = 'loading'
      AND EXISTS (SELECT 1 FROM modeld_hosts
                  WHERE host_id = $12 AND epoch = $13 AND lease_expires_at > now())
    RETURNING 1
), bumped AS (
    UPDATE modeld_hosts SET version = nextval('modeld_version')
    WHERE host_id = $12 AND epoch = $13 AND EXISTS (SELECT 1 FROM bound)
    RETURNING 1
), written AS (
    INSERT INTO {REPLICA_COLUMNS}
    SELECT $4, $12, $13, $5, $6, $7, $8, $9, $10, $11, now() FROM bound
    {REPLICA_CONFLICT}
    RETURNING 1
)
SELECT pg_notify($14, $12) FROM bound
"""


@dataclass(frozen=True, slots=True)
class Slot:
    """One claim row as read, with its replica's published state (None: no row)."""

    slot: int
    claim_id: int
    owner: str
    state: str
    live: bool
    replica_state: str | None = None
    error: str = ""
    code: str = ""

    @property
    def held(self) -> bool:
        return self.replica_state is not None if self.state == SERVING else self.live

    def describe(self) -> str:
        if self.state == SERVING:
            return f"slot {self.slot}: a {self.replica_state} replica"
        return f"slot {self.slot}: {self.state} by host {self.owner}"


@dataclass(frozen=True, slots=True)
class Claim:
    model: str
    slot: int
    claim_id: int
    took_over: bool = False

    @property
    def marker(self) -> str:
        """What a forwarded Load carries so that its target can bind to this claim."""
        return Marker(slot=self.slot, claim=self.claim_id).encode()


@dataclass(frozen=True, slots=True)
class Wait:
    why: str


@dataclass(frozen=True, slots=True)
class Failed:
    error: str
    code: str


@dataclass(frozen=True, slots=True)
class Full:
    held: tuple[Slot, ...]


Decision = Claim | Wait | Failed | Full


def claim_of(model: str, marker: Marker | None) -> Claim | None:
    """The claim a forwarded Load carries, or None for a plain Load."""
    if marker is None or marker.slot is None or marker.claim is None:
        return None
    return Claim(model, marker.slot, marker.claim)


def decide(model: str, slots: Sequence[Slot], max_replicas: int, *, cold: bool) -> Decision:
    """What a start of `model` may do, given its claim rows (pure).

    A model in failure backoff fails every start. A cold start (a Route with no
    READY replica in sight) waits while another start is loading or a READY
    replica was just published, so that a cold model starts once; any start
    then takes the lowest free slot below max_replicas.
    """
    for s in slots:
        if s.state == FAILED and s.live:
            return Failed(s.error, s.code)
    if cold:
        for s in slots:
            if s.state == LOADING and s.live:
                return Wait(f"host {s.owner} is starting it")
            if s.state == SERVING and s.replica_state == "READY":
                return Wait("a replica was just published")
    free = free_slot(slots, max_replicas)
    if free is not None:
        current = next((s for s in slots if s.slot == free), None)
        return Claim(model, free, 0, current is not None and current.state == LOADING)
    held = tuple(s for s in slots if s.slot < max_replicas)
    return Wait("every slot is held") if cold else Full(held)


def free_slot(slots: Sequence[Slot], max_replicas: int) -> int | None:
    """The lowest slot below max_replicas that nothing holds, None when all are held (pure)."""
    by_slot = {s.slot: s for s in slots}
    for n in range(max_replicas):
        current = by_slot.get(n)
        if current is None or not current.held:
            return n
    return None


class ClaimStore:
    """The claim statements, on this host's one link (link.py)."""

    def __init__(self, link: Link, host_id: str, timeout: float) -> None:
        self._link = link
        self._host = host_id
        self._timeout = timeout

    async def take(self, model: str, max_replicas: int, ttl: float, *, cold: bool) -> Decision:
        try:
            async with self._link.acquire() as conn, conn.transaction():
                lock = "SELECT pg_advisory_xact_lock($1, hashtext($2))"
                await conn.execute(lock, CLAIM_LOCK, model)
                rows = await conn.fetch(_SLOTS, model)
                decision = decide(model, [Slot(*row) for row in rows], max_replicas, cold=cold)
                if not isinstance(decision, Claim):
                    return decision
                claim_id = await conn.fetchval(_TAKE, model, decision.slot, self._host, ttl)
        except DB_ERRORS as exc:
            raise _down(f"claiming model {model!r}", exc) from None
        if claim_id is None:
            return Wait("the slot was taken meanwhile")
        return Claim(model, decision.slot, claim_id, decision.took_over)

    async def unclaimed(self, replica_ids: Sequence[str]) -> set[str]:
        """Those of `replica_ids` that no claim names (one round trip)."""
        try:
            rows = await self._link.fetch(
                "SELECT id FROM unnest($1::text[]) AS id EXCEPT "
                "SELECT replica_id FROM modeld_claims WHERE replica_id = ANY($1::text[])",
                list(replica_ids),
            )
        except DB_ERRORS as exc:
            raise _down("reading the slots of this host's replicas", exc) from None
        return {row["id"] for row in rows}

    async def adopt(self, model: str, max_replicas: int, replica_id: str) -> bool:
        """True when the running `replica_id` holds one of the model's slots, taking a
        free one when it holds none; False when every slot is held by others."""
        try:
            async with self._link.acquire() as conn, conn.transaction():
                lock = "SELECT pg_advisory_xact_lock($1, hashtext($2))"
                await conn.execute(lock, CLAIM_LOCK, model)
                mine = "SELECT 1 FROM modeld_claims WHERE model = $1 AND replica_id = $2"
                if await conn.fetchval(mine, model, replica_id) is not None:
                    return True
                rows = await conn.fetch(_SLOTS, model)
                free = free_slot([Slot(*row) for row in rows], max_replicas)
                if free is None:
                    return False
                taken = await conn.fetchval(_ADOPT, model, free, self._host, replica_id)
        except DB_ERRORS as exc:
            raise _down(f"re-taking the slots of model {model!r}", exc) from None
        return taken is not None

    async def renew(self, claim: Claim, ttl: float) -> bool:
        """False once the claim was taken over (or ended): its load must not publish."""
        return await self._one(
            """
            UPDATE modeld_claims SET expires_at = now() + make_interval(secs => $4)
            WHERE model = $1 AND slot = $2 AND claim_id = $3 AND state = 'loading'
            RETURNING 1
            """,
            claim,
            ttl,
        )

    async def release(self, claim: Claim) -> bool:
        return await self._one(
            "DELETE FROM modeld_claims WHERE model = $1 AND slot = $2 AND claim_id = $3 "
            "AND state = 'loading' RETURNING 1",
            claim,
        )

    async def fail(self, claim: Claim, error: str, code: str, base: float, cap: float) -> bool:
        """Record a failed load: waiters everywhere get `error` until the backoff ends."""
        return await self._one(
            """
            UPDATE modeld_claims SET state = 'failed', error = $4, code = $5,
                failures = failures + 1,
                expires_at = now() + make_interval(secs => least($6 * power(2, failures), $7))
            WHERE model = $1 AND slot = $2 AND claim_id = $3 AND state = 'loading'
            RETURNING 1
            """,
            claim,
            error[:2000],
            code,
            base,
            cap,
        )

    async def read(self, model: str) -> list[Slot]:
        try:
            rows = await self._link.fetch(_SLOTS, model)
        except DB_ERRORS as exc:
            raise _down(f"reading the claims of model {model!r}", exc) from None
        return [Slot(*row) for row in rows]

    async def bind(self, claim: Claim, epoch: int, row: PublishedRow) -> bool:
        """Publish `row` as the replica serving `claim`, only if the claim still holds."""
        try:
            rows = await self._link.fetch(
                _BIND,
                claim.model,
                claim.slot,
                claim.claim_id,
                *row,
                self._host,
                epoch,
                CHANNEL,
            )
        except DB_ERRORS as exc:
            raise _down(f"publishing a replica of model {claim.model!r}", exc) from None
        return bool(rows)

    async def _one(self, sql: str, claim: Claim, *args: object) -> bool:
        try:
            done = await self._link.fetchval(sql, claim.model, claim.slot, claim.claim_id, *args)
        except DB_ERRORS as exc:
            raise _down(f"updating the claim on model {claim.model!r}", exc) from None
        return done is not None


def _down(what: str, exc: BaseException) -> Unavailable:
    return Unavailable(f"{what} needs the cluster database: {type(exc).__name__}: {exc}"[:500])
