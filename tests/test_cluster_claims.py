"""Cold starts across the cluster, with three real daemons and real PostgreSQL.

The model `gated` runs tests/gated_backend.py: every start writes a marker file
(so starts are counted across all hosts) and holds until the test creates the
gate file, which keeps a load in progress for as long as a test needs.
"""

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import grpc
import pytest

from cluster_proc import HOST_TTL, db_rows, running_cluster
from daemon_proc import DaemonProc
from modeld._proto.modeld.v1 import modeld_pb2 as pb

pytestmark = pytest.mark.timeout(120)
GATED = str(Path(__file__).with_name("gated_backend.py"))
# Claims outlive their owner's host row by this factor (coldstart.CLAIM_TTL_HOSTS).
CLAIM_TTL = 3 * HOST_TTL


def gated_toml(gate: Path, extra: str = "", flags: str = "") -> str:
    return (
        f'[backends.gated]\ncommand = ["{sys.executable}", "{GATED}", "{gate}", '
        f'"--addr", "{{addr}}"{flags}]\nstop_grace = "2s"\n'
        f'[models.gated]\nbackend = "gated"\n{extra}'
    )


def cluster(
    tmp_path: Path, dsn: str, extras: Mapping[str, str]
) -> contextlib.AbstractAsyncContextManager[dict[str, DaemonProc]]:
    """Hosts named by `extras`, each with its own extra config."""
    return running_cluster(tmp_path, dsn, list(extras), extra=extras)


async def until(what: str, check: Callable[[], Awaitable[bool]], limit_s: float) -> None:
    """Wait for a condition outside the test's own process (files, database rows)."""
    end = time.monotonic() + limit_s
    while not await check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def spawns(gate: Path) -> int:
    return len(list(gate.glob("spawn-*")))


async def spawned(gate: Path, n: int) -> None:
    async def check() -> bool:
        return spawns(gate) >= n

    await until(f"{n} backend start(s)", check, 30)


async def claim_owner(dsn: str, model: str = "gated") -> str | None:
    rows = await db_rows(
        dsn, "SELECT owner_host FROM modeld_claims WHERE model = $1 AND state = 'loading'", model
    )
    return rows[0]["owner_host"] if rows else None


async def ready_rows(dsn: str, model: str = "gated") -> list[tuple[str, str]]:
    rows = await db_rows(
        dsn,
        "SELECT host_id, replica_id FROM modeld_replicas WHERE model = $1 AND state = 'READY'",
        model,
    )
    return [(r["host_id"], r["replica_id"]) for r in rows]


async def route(daemon: DaemonProc, model: str = "gated") -> pb.RouteResponse:
    reply: pb.RouteResponse = await daemon.stub.Route(pb.RouteRequest(model=model), timeout=60)
    return reply


def event(name: str, **fields: object) -> Callable[[dict[str, object]], bool]:
    return lambda e: e.get("event") == name and all(e.get(k) == v for k, v in fields.items())


@pytest.fixture
def gate(tmp_path: Path) -> Path:
    folder = tmp_path / "gate"
    folder.mkdir()
    return folder


async def test_100_cold_routes_over_3_hosts_start_one_backend(
    tmp_path: Path, pg_dsn: str, gate: Path
) -> None:
    extras = {h: gated_toml(gate) for h in ("a", "b", "c")}
    async with cluster(tmp_path, pg_dsn, extras) as hosts:
        daemons = list(hosts.values())
        calls = [asyncio.ensure_future(route(daemons[i % 3])) for i in range(100)]
        await spawned(gate, 1)
        (gate / "open").touch()
        replies = await asyncio.gather(*calls)
        assert all(r.lease_id for r in replies)
        assert len({r.replica_id for r in replies}) == 1
        assert spawns(gate) == 1
        assert len(await ready_rows(pg_dsn)) == 1
        # One start drove the claim; the other hosts' waited for it (a host whose Routes
        # all came once the replica was in sight started none) (coldphase.py).
        paths = [phases(d) for d in daemons]
        drove = [p for p in paths if p not in ([], ["ready"])]
        assert drove == [["placing", "loading", "seeing", "ready"]], paths


def phases(daemon: DaemonProc) -> list[str]:
    moves = [e for e in daemon.log if event("cluster_start_phase", model="gated")(e)]
    return [str(e["to_phase"]) for e in moves]


@pytest.mark.long
async def test_owner_killed_mid_load_is_taken_over(tmp_path: Path, pg_dsn: str, gate: Path) -> None:
    extras = {h: gated_toml(gate) for h in ("a", "b", "c")}
    async with cluster(tmp_path, pg_dsn, extras) as hosts:
        a, b, c = hosts["a"], hosts["b"], hosts["c"]
        first = asyncio.ensure_future(route(a))

        async def a_owns() -> bool:
            return await claim_owner(pg_dsn) == "a"

        await until("a's claim", a_owns, 20)
        await spawned(gate, 1)
        waiters = [asyncio.ensure_future(route(d)) for d in (b, c) * 5]
        a.proc.kill()
        await a.proc.wait()
        (gate / "open").touch()
        replies = await asyncio.gather(*waiters)
        assert len({r.replica_id for r in replies}) == 1
        assert all(r.lease_id.startswith(("b~", "c~")) for r in replies)
        with pytest.raises(grpc.aio.AioRpcError):
            await first
        # a's backend died with it; the load completed once, elsewhere.
        assert spawns(gate) == 2
        assert [h for h, _ in await ready_rows(pg_dsn)] in (["b"], ["c"])
        taken_over = event("cluster_claim_taken", took_over=True)
        assert sum(1 for d in (b, c) for e in d.log if taken_over(e)) == 1


@pytest.mark.long
async def test_owner_stopped_past_expiry_cannot_publish(
    tmp_path: Path, pg_dsn: str, gate: Path
) -> None:
    extras = {h: gated_toml(gate) for h in ("a", "b", "c")}
    async with cluster(tmp_path, pg_dsn, extras) as hosts:
        a, b = hosts["a"], hosts["b"]
        most = 0
        watching = True

        async def watch() -> None:
            nonlocal most
            while watching:
                most = max(most, len(await ready_rows(pg_dsn)))
                await asyncio.sleep(0.05)

        watcher = asyncio.ensure_future(watch())
        first = asyncio.ensure_future(route(a))

        async def a_owns() -> bool:
            return await claim_owner(pg_dsn) == "a"

        async def taken_over() -> bool:
            return await claim_owner(pg_dsn) not in (None, "a")

        await until("a's claim", a_owns, 20)
        await spawned(gate, 1)
        a.proc.send_signal(signal.SIGSTOP)
        try:
            second = asyncio.ensure_future(route(b))
            await until("the claim taken over", taken_over, 4 * CLAIM_TTL + 10)
            await spawned(gate, 2)
            (gate / "open").touch()
            winner = await second
            assert not winner.lease_id.startswith("a~")
        finally:
            a.proc.send_signal(signal.SIGCONT)
        await a.wait_log(event("cluster_claim_fenced"), 30)
        late = await first
        assert late.replica_id == winner.replica_id
        assert [r for _, r in await ready_rows(pg_dsn)] == [winner.replica_id]
        watching = False
        await watcher
        assert most == 1
        assert spawns(gate) == 2


async def test_two_loads_on_two_hosts_under_max_replicas_1(
    tmp_path: Path, pg_dsn: str, gate: Path
) -> None:
    extras = {h: gated_toml(gate) for h in ("a", "b")}
    async with cluster(tmp_path, pg_dsn, extras) as hosts:
        loads = [
            asyncio.ensure_future(d.stub.Load(pb.LoadRequest(model="gated"), timeout=60))
            for d in hosts.values()
        ]
        done, _ = await asyncio.wait(loads, return_when=asyncio.FIRST_COMPLETED)
        refused = done.pop().exception()
        assert isinstance(refused, grpc.aio.AioRpcError)
        assert refused.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "max_replicas = 1" in (refused.details() or "")
        (gate / "open").touch()
        loaded = await next(t for t in loads if not t.done())
        assert len(loaded.replicas) == 1
        assert [r for _, r in await ready_rows(pg_dsn)] == [loaded.replicas[0].id]
        assert spawns(gate) == 1


async def test_refused_by_the_first_host_then_the_next(
    tmp_path: Path, pg_dsn: str, gate: Path
) -> None:
    huge = 'memory_estimate = "100TiB"\n'
    # c, a router, owns the claim and places on the nodes a and b; a's own admission
    # refuses (its spec's estimate fits no device), and b is next.
    router = 'role = "router"\n'
    extras = {"a": gated_toml(gate, huge), "b": gated_toml(gate), "c": router + gated_toml(gate)}
    (gate / "open").touch()
    async with cluster(tmp_path, pg_dsn, extras) as hosts:
        reply = await route(hosts["c"])
        assert reply.lease_id.startswith("b~")
        refused = await hosts["c"].wait_log(event("cluster_placement_refused", host_id="a"), 5)
        assert "cannot start" in str(refused["error"])
        assert spawns(gate) == 1


async def test_a_failed_load_fails_every_waiter_and_backs_off_cluster_wide(
    tmp_path: Path, pg_dsn: str, gate: Path
) -> None:
    extras = {h: gated_toml(gate, flags=', "--fail-load"') for h in ("a", "b", "c")}
    async with cluster(tmp_path, pg_dsn, extras) as hosts:
        calls = [asyncio.ensure_future(route(d)) for d in hosts.values() for _ in range(3)]
        await spawned(gate, 1)
        (gate / "open").touch()
        failures = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(f, grpc.aio.AioRpcError) for f in failures), failures
        codes = {f.code() for f in failures if isinstance(f, grpc.aio.AioRpcError)}
        assert len(codes) == 1
        # In backoff: refused at once on any host, and nothing starts again.
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await route(hosts["c"])
        assert again.value.code() in codes
        assert "failure backoff" in (again.value.details() or "")
        assert time.monotonic() - started < 5
        assert spawns(gate) == 1


async def test_a_router_starts_a_cold_model_on_a_node(
    tmp_path: Path, pg_dsn: str, gate: Path
) -> None:
    (gate / "open").touch()
    extras = {"r": 'role = "router"\n' + gated_toml(gate), "n": gated_toml(gate)}
    async with cluster(tmp_path, pg_dsn, extras) as hosts:
        reply = await route(hosts["r"])
        assert reply.lease_id.startswith("n~")
        assert spawns(gate) == 1
