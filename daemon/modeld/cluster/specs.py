"""Model specs shared by the whole cluster: PutModel/DeleteModel on any host.

The cluster's specs live in PostgreSQL (`modeld_models`, with the version of the
whole set in `modeld_models_version`, bumped in the same transaction as every
change). PutModel and DeleteModel write there first, then resync; a host that is
not the writer hears the change on `NOTIFY modeld_models` (LISTEN on the host's one
link, link.py) and resyncs; a resync after every reconnect covers notifications
missed while the link was down (a live connection loses none, so there is no
periodic reread: an idle cluster costs nothing here). A resync reads the whole set
with its version in one statement and, when the version moved, hands the whole set
to the catalog (`Catalog.adopt_shared`), which makes this host's API models
exactly the cluster's. A lock serialises the resyncs and the writes of this host,
so an older read is never applied after a newer write.

How `[models.*]` in a host's config combine with the cluster's specs: a config
model is this host's own and wins on this host (PutModel/DeleteModel of its name
through this host is refused, as without a cluster); it is not published. When the
cluster also has a spec of that name, and it differs, the host says so at start
and at every change of that spec: `cluster_spec_diverges` naming the fields. A
cluster spec this host cannot use (its backend is not in this host's catalog) is
left out here and named in `cluster_spec_unusable`.
"""

import asyncio
import contextlib
import json
from dataclasses import fields
from typing import Any

import asyncpg
import structlog

from modeld.cluster.link import DB_ERRORS
from modeld.cluster.membership import Membership
from modeld.cluster.schema import SPECS_CHANNEL
from modeld.errors import FailedPrecondition, ResourceExhausted, Unavailable
from modeld.spec import ModelSpec
from modeld.storage.catalog import MAX_API_MODELS, Catalog

log = structlog.get_logger(__name__)
_READ = """
SELECT (SELECT version FROM modeld_models_version) AS version,
       coalesce((SELECT json_object_agg(name, json_build_object('spec', spec, 'version', version))
                 FROM modeld_models), '{}') AS specs
"""
_BUMP = "UPDATE modeld_models_version SET version = version + 1 RETURNING version"
_PUT = """
INSERT INTO modeld_models (name, spec, version, updated_by) VALUES ($1, $2::jsonb, $3, $4)
ON CONFLICT (name) DO UPDATE SET spec = EXCLUDED.spec, version = EXCLUDED.version,
    updated_by = EXCLUDED.updated_by, updated_at = now()
"""
_SPEC_FIELDS = frozenset(f.name for f in fields(ModelSpec))
# Fields that say where a spec came from, not what runs: never a divergence.
_NOT_COMPARED = frozenset({"name", "source"})


class SharedSpecs:
    def __init__(
        self,
        *,
        host_id: str,
        catalog: Catalog,
        membership: Membership,
        interval: float,
        timeout: float,
    ) -> None:
        self._link = membership.link
        self._host = host_id
        self._catalog = catalog
        self._membership = membership
        self._interval = interval
        self._timeout = timeout
        self._lock = asyncio.Lock()
        # Version of the cluster's set last handed to the catalog (-1: none yet).
        self._applied = -1
        # model -> (spec version, what was said about it), so each is said once.
        self._said: dict[str, tuple[int, str]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._link.listen(SPECS_CHANNEL, self._notified)
        self._link.on_up(self._wake.set)

    async def start(self) -> None:
        # The first resync runs before start returns, so the divergence check is logged
        # at start (when the database is reachable).
        with contextlib.suppress(*DB_ERRORS):
            await self.resync()
        self._task = self._membership.spawn(self._run(), "cluster-specs")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.resync()
            except DB_ERRORS as exc:
                # The link reports itself; a failed read on a live link is tried again.
                log.debug("cluster_specs_resync_failed", error=f"{type(exc).__name__}: {exc}")
                if self._link.up:
                    await asyncio.sleep(self._interval)  # the retry period
                    self._wake.set()
            except Exception:
                log.exception("cluster_specs_resync_failed")

    def _notified(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        self._wake.set()

    # resync

    async def resync(self) -> None:
        async with self._lock:
            await self._resync_locked()

    async def _resync_locked(self) -> None:
        row = await self._link.fetchrow(_READ)
        assert row is not None
        version = int(row["version"])
        if version == self._applied:
            return
        rows = json.loads(row["specs"])
        shared: dict[str, tuple[ModelSpec, list[str]]] = {}
        unreadable: dict[str, str] = {}
        for name, data in rows.items():
            try:
                shared[name] = _decode(name, data["spec"])
            except (TypeError, ValueError, KeyError) as exc:
                unreadable[name] = f"its stored spec cannot be read ({type(exc).__name__}: {exc})"
        unusable = await self._catalog.adopt_shared({n: s for n, (s, _) in shared.items()})
        unusable.update(unreadable)
        self._applied = version
        for name in rows:
            spec, ignored = shared.get(name, (None, []))
            self._say(name, int(rows[name]["version"]), spec, ignored, unusable.get(name, ""))
        for name in set(self._said) - set(rows):
            del self._said[name]

    def _say(
        self, name: str, version: int, spec: ModelSpec | None, ignored: list[str], why: str
    ) -> None:
        """Log once per spec version what keeps this host from running the cluster's spec."""
        config = self._catalog.config_spec(name)
        differ = diverging_fields(config, spec) if config and spec else []
        said = f"{differ}|{ignored}|{why}"
        if self._said.get(name) == (version, said):
            return
        self._said[name] = (version, said)
        if differ:
            log.warning(
                "cluster_spec_diverges",
                model=name,
                fields=differ,
                kept="config",
                hint="this host's [models] entry wins here; align it or remove it",
            )
        if ignored:
            log.warning("cluster_spec_fields_unknown", model=name, fields=ignored)
        if why:
            log.warning("cluster_spec_unusable", model=name, reason=why)

    # writes

    async def put(self, spec: ModelSpec) -> ModelSpec:
        """Validate here, store for the cluster, then apply the cluster's set here."""
        spec = self._catalog.check(spec)
        self._membership.require(f"PutModel of {spec.name!r}")
        body = json.dumps(spec.to_dict())
        async with self._lock:
            await self._write(f"PutModel of {spec.name!r}", self._put_sql, spec.name, body)
            await self._apply_written()
        return spec

    async def delete(self, name: str) -> bool:
        if self._catalog.config_spec(name) is not None:
            raise FailedPrecondition(
                f"model {name!r} is defined in this host's config file; remove it there"
            )
        self._membership.require(f"DeleteModel of {name!r}")
        async with self._lock:
            deleted = await self._write(f"DeleteModel of {name!r}", self._delete_sql, name, "")
            await self._apply_written()
        return deleted

    async def _apply_written(self) -> None:
        """After a committed write: it is the cluster's now, whether or not this read
        succeeds; a failed read is repaired by the next resync."""
        with contextlib.suppress(*DB_ERRORS):
            await self._resync_locked()

    async def _write(self, what: str, step: Any, name: str, body: str) -> bool:
        try:
            async with self._link.acquire() as conn, conn.transaction():
                done: bool = await step(conn, name, body)
        except DB_ERRORS as exc:
            raise Unavailable(
                f"{what} needs the cluster database ({self._membership.where}), which failed "
                f"({type(exc).__name__}: {str(exc)[:160]}); nothing was changed, try again"
            ) from None
        return done

    async def _put_sql(self, conn: asyncpg.Connection, name: str, body: str) -> bool:
        count, exists = await conn.fetchrow(
            "SELECT count(*), count(*) FILTER (WHERE name = $1) FROM modeld_models", name
        )
        if not exists and count >= MAX_API_MODELS:
            raise ResourceExhausted(
                f"the cluster holds {MAX_API_MODELS} models put through the API, its limit; "
                "delete one first"
            )
        version = await conn.fetchval(_BUMP)
        await conn.execute(_PUT, name, body, version, self._host)
        await conn.execute("SELECT pg_notify($1, $2)", SPECS_CHANNEL, str(version))
        return True

    async def _delete_sql(self, conn: asyncpg.Connection, name: str, _body: str) -> bool:
        gone = await conn.fetchval("DELETE FROM modeld_models WHERE name = $1 RETURNING 1", name)
        if gone is None:
            return False
        version = await conn.fetchval(_BUMP)
        await conn.execute("SELECT pg_notify($1, $2)", SPECS_CHANNEL, str(version))
        return True


def _decode(name: str, data: dict[str, Any]) -> tuple[ModelSpec, list[str]]:
    """A stored spec, and the fields a newer modeld wrote that this one does not know."""
    ignored = sorted(set(data) - _SPEC_FIELDS)
    known = {k: v for k, v in data.items() if k in _SPEC_FIELDS}
    known["name"] = name
    return ModelSpec.from_dict(known).with_source("api"), ignored


def diverging_fields(config: ModelSpec, shared: ModelSpec) -> list[str]:
    """The fields in which this host's config spec and the cluster's differ."""
    mine, theirs = config.to_dict(), shared.to_dict()
    return sorted(k for k in mine if k not in _NOT_COMPARED and mine[k] != theirs.get(k))
