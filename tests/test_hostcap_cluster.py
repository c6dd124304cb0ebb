"""Host capacity and labels, published by real daemons over real PostgreSQL and read
back into other modelds' views: each daemon's own (its `cluster_capacity_seen` debug
lines) and an in-test membership's, through `capacities()` into `place()`."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from cluster_proc import start_host
from daemon_proc import DaemonProc
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.capacity.resources import write_fake
from modeld.clock import SystemClock
from modeld.cluster.hostcap import GRID, capacities
from modeld.cluster.membership import Membership
from modeld.cluster.schema import migrate
from modeld.cluster.store import Fenced, Store
from modeld.cluster.view import HostFigures
from modeld.config import ClusterConfig
from modeld.errors import FailedPrecondition
from modeld.ops.events import EventBus
from modeld.policy.host_placement import HostCapacity, place
from modeld.policy.view import GpuView, HostView
from modeld.spec import ModelSpec
from pg import pg_dsn  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(120)
GIB = 1 << 30
LIMIT = 20.0


def gpus(*free_gib: int) -> tuple[GpuView, ...]:
    return tuple(
        GpuView(i, f"GPU-fake-{i}", "Fake", 80 * GIB, (80 - free) * GIB + 12345)
        for i, free in enumerate(free_gib)
    )


@contextlib.asynccontextmanager
async def observer(dsn: str) -> AsyncIterator[Membership]:
    """A router-role member in the test process: the membership code the daemons run."""
    cfg = ClusterConfig(
        dsn=dsn,
        dsn_file="",
        host_id="observer",
        advertise="127.0.0.1:1",
        backend_host="127.0.0.1",
        host_ttl=2.0,
        role="router",
    )
    member = Membership(cfg, dsn, SystemClock(), EventBus(), list)
    await member.start()
    try:
        yield member
    finally:
        await member.close()


async def seen_by(member: Membership, ok: Callable[[dict[str, HostCapacity]], bool]) -> Any:
    """The member's capacities once `ok` holds of them (re-checked as the view changes)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LIMIT
    while True:
        now = SystemClock().monotonic()
        live = capacities(member.view, now, trust_expired=member.trust_expired())
        by_id = {c.host_id: c for c in live}
        if ok(by_id):
            return by_id
        assert loop.time() < deadline, f"capacities never matched: {by_id}"
        await asyncio.sleep(0.05)


def logged_capacity(host: str, **fields: object) -> Callable[[dict[str, Any]], bool]:
    return lambda e: (
        e.get("event") == "cluster_capacity_seen"
        and e.get("host_id") == host
        and all(e.get(k) == v for k, v in fields.items())
    )


async def test_capacity_and_labels_are_published_and_read_back(
    tmp_path: Path,
    pg_dsn: str,  # noqa: F811
) -> None:
    fake_a, fake_b = tmp_path / "a.json", tmp_path / "b.json"
    write_fake(fake_a, HostView(128 * GIB, 100 * GIB, gpus(70, 40)))
    write_fake(fake_b, HostView(64 * GIB, 48 * GIB, ()))
    extra_a = f'labels = {{ gpu = "h100" }}\n[resources]\nfake_path = "{fake_a}"\n'
    extra_b = (
        f'labels = {{ gpu = "a100", zone = "b" }}\n[resources]\nfake_path = "{fake_b}"\n'
        "[watchdog]\nmax_loaded = 3\n"
    )
    async with contextlib.AsyncExitStack() as stack:
        a, b = await asyncio.gather(
            start_host(tmp_path, pg_dsn, "a", extra=extra_a),
            start_host(tmp_path, pg_dsn, "b", extra=extra_b),
        )
        stack.push_async_callback(_stop, a)
        stack.push_async_callback(_stop, b)
        member = await stack.enter_async_context(observer(pg_dsn))

        # Each daemon reads the other's figures back into its own view.
        await b.wait_log(logged_capacity("a", gpu_total=[80 * GIB, 80 * GIB]), LIMIT)
        await a.wait_log(logged_capacity("b", max_loaded=3, backends=["echo"]), LIMIT)

        hosts = await seen_by(member, lambda h: {"a", "b"} <= h.keys() and h["a"].gpu_total != ())
        ha, hb = hosts["a"], hosts["b"]
        assert (ha.role, dict(ha.labels), ha.backends) == ("node", {"gpu": "h100"}, {"echo"})
        # Floored to the grid: 12345 bytes of noise in "used" cost one grid step.
        assert ha.gpu_free == (70 * GIB - GRID, 40 * GIB - GRID)
        assert (ha.ram_total, ha.ram_free, ha.max_loaded) == (128 * GIB, 100 * GIB, 0)
        assert dict(hb.labels) == {"gpu": "a100", "zone": "b"}
        assert (hb.gpu_total, hb.max_loaded) == ((), 3)
        assert (hb.ram_free, hb.loaded, hb.model_replicas) == (48 * GIB, 0, {})
        assert hosts["observer"].role == "router"

        spec = ModelSpec(name="big", backend="echo", memory_estimate=60 * GIB)
        assert place("big", spec, list(hosts.values())) == ["a", "b"]
        h100 = ModelSpec(name="big", backend="echo", host_labels=(("gpu", "h100"),))
        assert place("big", h100, list(hosts.values())) == ["a"]
        with pytest.raises(FailedPrecondition, match="hosts' labels: a \\{gpu=h100\\}"):
            place("big", ModelSpec(name="x", backend="echo", host_labels=(("gpu", "b200"),)), [ha])

        # A replica on b: its count, and (idle, unpinned) its bytes as evictable.
        small = pb.ModelSpec(
            name="small", backend="echo", memory_estimate=GIB, host_labels={"zone": "b"}
        )
        await b.stub.PutModel(pb.PutModelRequest(spec=small), timeout=10)
        await b.stub.Load(pb.LoadRequest(model="small"), timeout=30)
        hosts = await seen_by(member, lambda h: h["b"].evictable == GIB)
        assert (hosts["b"].loaded, hosts["b"].model_replicas) == (1, {"small": 1})
        await a.wait_log(logged_capacity("b", loaded=1, evictable=GIB), LIMIT)
        # Spread: the host without a replica of the model first; binpack: the one with it.
        spec = ModelSpec(name="small", backend="echo")
        assert place("small", spec, list(hosts.values()), mode="spread") == ["a", "b"]
        assert place("small", spec, list(hosts.values()), mode="binpack") == ["b", "a"]

        # A change in free GPU memory is published again.
        write_fake(fake_a, HostView(128 * GIB, 100 * GIB, gpus(10, 40)))
        await seen_by(member, lambda h: h["a"].gpu_free[0] == 10 * GIB - GRID)
        await b.wait_log(logged_capacity("a", gpu_free=[10 * GIB - GRID, 40 * GIB - GRID]), LIMIT)


async def test_spec_placement_fields_through_put_model(tmp_path: Path, pg_dsn: str) -> None:  # noqa: F811
    a = await start_host(tmp_path, pg_dsn, "a")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            bad = pb.ModelSpec(name="m", backend="echo", placement="pack")
            await a.stub.PutModel(pb.PutModelRequest(spec=bad), timeout=10)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "placement 'pack'" in (caught.value.details() or "")
        good = pb.ModelSpec(
            name="m", backend="echo", placement="binpack", host_labels={"gpu": "h100"}
        )
        await a.stub.PutModel(pb.PutModelRequest(spec=good), timeout=10)
        listed = await a.stub.ListModels(pb.ListModelsRequest(), timeout=10)
        shown = next(m for m in listed.models if m.name == "m")
        assert (shown.placement, dict(shown.host_labels)) == ("binpack", {"gpu": "h100"})
    finally:
        await _stop(a)


async def test_a_fenced_epoch_cannot_publish_capacity(pg_dsn: str) -> None:  # noqa: F811
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        store = Store(pool, "h", 5.0)
        old = await store.register("127.0.0.1:1", "node", {}, 10.0, [])
        new = await store.register("127.0.0.1:1", "node", {}, 10.0, [])
        await store.publish_host(new, HostFigures(backends=("echo",), loaded=2))
        with pytest.raises(Fenced):
            await store.publish_host(old, HostFigures(backends=("stale",), loaded=9))
        snap = await store.read(["h"])
        assert (snap.hosts[0]["backends"], snap.hosts[0]["loaded"]) == (["echo"], 2)
        # A new epoch starts from nothing: an earlier life's figures do not survive it.
        await store.register("127.0.0.1:1", "node", {}, 10.0, [])
        snap = await store.read(["h"])
        assert (snap.hosts[0]["backends"], snap.hosts[0]["loaded"]) == ([], 0)
    finally:
        await pool.close()


async def _stop(daemon: DaemonProc) -> None:
    if daemon.proc.returncode is None:
        with contextlib.suppress(TimeoutError):
            await daemon.stop()
    await daemon.close()
