"""Affinity keys and backend-reported load end to end: one real daemon for the module.

Affinity: three real echo replicas and the Python client's `affinity_key=`.
Load: the daemon scrapes real HTTP backends' /metrics; the test backend
(tests/backends/load_backend.py) serves what the test writes into DIR/PORT.prom and
counts its scrapes in DIR/PORT.hits, so every wait here is on a scrape that
happened, never on time.
"""

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from backend_proc import free_port
from daemon_proc import DaemonProc, running_daemon
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.cli import render
from modeld.client import AsyncClient, InvalidArgument
from test_daemon_metrics import scrape, value

pytestmark = pytest.mark.asyncio(loop_scope="module")
BACKEND = Path(__file__).parent / "backends" / "load_backend.py"
KEYS = [f"conversation-{i}" for i in range(300)]


def catalog(report_dir: Path, metrics_port: int) -> str:
    return f"""
metrics_listen = "127.0.0.1:{metrics_port}"
[backends.echo]
command = ["{{python}}", "-m", "modeld.backends.echo", "--addr", "{{addr}}"]
stop_grace = "300ms"
[models.trio]
backend = "echo"
max_replicas = 3
[backends.served]
command = ["{{python}}", "{BACKEND}", "--host", "{{host}}", "--port", "{{port}}",
           "--dir", "{report_dir}"]
protocol = "http"
stop_grace = "1s"
load_metrics = "vllm"
load_interval = "100ms"
saturation_waiting = 5
[models.pair]
backend = "served"
max_replicas = 2
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def daemon(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DaemonProc]:
    tmp_path = tmp_path_factory.mktemp("load-routing")
    (tmp_path / "reports").mkdir()
    port = free_port()
    async with running_daemon(tmp_path, catalog(tmp_path / "reports", port)) as d:
        d.metrics_port = port  # type: ignore[attr-defined]
        yield d


@pytest_asyncio.fixture(loop_scope="module")
async def client(daemon: DaemonProc) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(daemon.addr) as c:
        yield c


async def homes(client: AsyncClient, keys: list[str]) -> dict[str, str]:
    """Each key's replica, one Route and Release at a time (nothing held meanwhile)."""
    out: dict[str, str] = {}
    for key in keys:
        lease = await client.route("trio", affinity_key=key)
        out[key] = lease.replica_id
        await client.release(lease)
    return out


async def test_keys_stick_spread_are_bounded_and_mostly_stay_when_a_replica_goes(
    daemon: DaemonProc, client: AsyncClient
) -> None:
    d = daemon
    loaded = await d.stub.Load(pb.LoadRequest(model="trio", replicas=3), timeout=30)
    assert len(loaded.replicas) == 3

    same = []
    for _ in range(30):
        async with client.lease("trio", affinity_key="k-7", renew=False) as lease:
            same.append(lease.replica_id)
    assert len(set(same)) == 1, Counter(same)

    before = await homes(client, KEYS)
    spread = Counter(before.values())
    assert len(spread) == 3 and min(spread.values()) >= 0.2 * len(KEYS), spread

    held = [await client.route("trio", affinity_key="hot-key") for _ in range(6)]
    per_replica = Counter(lease.replica_id for lease in held)
    assert max(per_replica.values()) <= 3, per_replica
    for lease in held:
        await client.release(lease)

    gone = loaded.replicas[0].id
    await d.stub.Unload(pb.UnloadRequest(replica_id=gone, force=True), timeout=30)
    after = await homes(client, KEYS)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(before[k] == gone for k in moved)
    assert len(moved) <= 0.45 * len(KEYS)

    with pytest.raises(InvalidArgument, match="affinity_key is 300 characters"):
        await client.route("trio", affinity_key="x" * 300)
    with pytest.raises(grpc.aio.AioRpcError) as raw:
        await d.stub.Route(pb.RouteRequest(model="trio", affinity_key="y" * 257))
    assert raw.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def vllm(waiting: int, running: int = 0) -> str:
    return (
        "# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{model_name="pair"}} {waiting}\n'
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{model_name="pair"}} {running}\n'
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{model_name="pair"} 0.25\n'
    )


async def until(what: str, check: Callable[[], Awaitable[bool]], limit_s: float = 15) -> None:
    """Wait for a condition outside the test's own process (files, the daemon's lists)."""
    end = time.monotonic() + limit_s
    while not await check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def listed(d: DaemonProc) -> dict[str, pb.Replica]:
    reply = await d.stub.ListReplicas(pb.ListReplicasRequest(model="pair"))
    return {r.id: r for r in reply.replicas}


def port_of(replica: pb.Replica) -> str:
    return replica.address.rpartition(":")[2]


async def test_a_saturated_replica_gets_no_lease_and_a_failing_scrape_changes_nothing(
    daemon: DaemonProc, client: AsyncClient
) -> None:
    d = daemon
    reports = d.config.parent / "reports"

    def report(replica: pb.Replica, text: str) -> None:
        tmp = reports / "tmp"
        tmp.write_text(text)
        tmp.rename(reports / f"{port_of(replica)}.prom")

    def hits(replica: pb.Replica) -> int:
        path = reports / f"{port_of(replica)}.hits"
        return len(path.read_text().splitlines()) if path.exists() else 0

    loaded = await d.stub.Load(pb.LoadRequest(model="pair", replicas=2), timeout=30)
    busy, calm = loaded.replicas
    report(busy, vllm(50, 4))
    report(calm, vllm(0))

    async def reported() -> bool:
        now = await listed(d)
        return now[busy.id].load_waiting == 50 and now[calm.id].load_reported

    await until("both reports in ListReplicas", reported)
    wide = render.ps_table(
        list((await listed(d)).values()), [render.Idle(None, None, "")] * 2, wide=True
    )
    assert "WAITING" in wide and "50" in wide and "25%" in wide

    samples = await scrape(d.metrics_port)  # type: ignore[attr-defined]
    waiting = value(samples, "modeld_backend_requests_waiting", model="pair", replica=busy.id)
    assert waiting == 50
    kv = value(samples, "modeld_backend_kv_cache_usage", model="pair", replica=calm.id)
    assert kv == 0.25

    held = [await client.route("pair") for _ in range(6)]
    assert Counter(lease.replica_id for lease in held) == {calm.id: 6}
    for lease in held:
        await client.release(lease)

    # Now one scrape hangs and the other reads garbage: both replicas are routed
    # on their leases alone, as without load_metrics, and stay READY.
    report(busy, "HANG")
    report(calm, "this {is} not = prometheus\n")
    seen = {busy.id: hits(busy), calm.id: hits(calm)}

    async def scraped_again() -> bool:
        return hits(busy) >= seen[busy.id] + 3 and hits(calm) >= seen[calm.id] + 3

    await until("three more scrapes of each", scraped_again)
    now = await listed(d)
    assert not now[busy.id].load_reported and not now[calm.id].load_reported
    assert {r.state for r in now.values()} == {pb.READY}
    held = [await client.route("pair") for _ in range(6)]
    assert Counter(lease.replica_id for lease in held) == {busy.id: 3, calm.id: 3}
    for lease in held:
        await client.release(lease)
    failed = Counter(e["replica_id"] for e in d.log if e.get("event") == "load_scrape_failed")
    assert failed == {busy.id: 1, calm.id: 1}, failed
    samples = await scrape(d.metrics_port)  # type: ignore[attr-defined]
    failures = value(samples, "modeld_load_scrape_failures_total", backend="served")
    assert failures is not None and failures >= 4  # the last hung scrape may still run
    assert value(samples, "modeld_backend_requests_waiting", model="pair", replica=busy.id) is None

    # Good reports again: the figures are back, and each recovery is logged once.
    report(busy, vllm(0))
    report(calm, vllm(1))

    async def back() -> bool:
        now = await listed(d)
        return now[busy.id].load_reported and now[calm.id].load_waiting == 1

    await until("both reports back", back)
    recovered = Counter(e["replica_id"] for e in d.log if e.get("event") == "load_scrape_recovered")
    assert recovered == {busy.id: 1, calm.id: 1}, recovered
