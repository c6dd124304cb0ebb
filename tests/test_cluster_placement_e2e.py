"""Placement choices of cold starts, with three real daemons and real PostgreSQL: a
Route sent to one host starts the model where its labels and free GPU memory say,
and a model no host can ever run fails with FAILED_PRECONDITION naming why."""

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest

from cluster_proc import db_rows, running_cluster
from daemon_proc import ECHO_CATALOG, DaemonProc
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.capacity.resources import write_fake
from modeld.policy.view import GpuView, HostView
from pg import pg_dsn  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(120)
GIB = 1 << 30
LIMIT = 30.0
HOSTS = ("a", "b", "c")
CATALOG = (
    ECHO_CATALOG
    + '[models.h100]\nbackend = "echo"\nhost_labels = { gpu = "h100" }\n'
    + '[models.b200]\nbackend = "echo"\nhost_labels = { gpu = "b200" }\n'
    + '[models.big]\nbackend = "echo"\nmemory_estimate = "40GiB"\n'
    + '[models.huge]\nbackend = "echo"\nmemory_estimate = "100GiB"\n'
)


@contextlib.asynccontextmanager
async def cluster(
    tmp_path: Path, dsn: str, extras: Mapping[str, str]
) -> AsyncIterator[dict[str, DaemonProc]]:
    async with running_cluster(tmp_path, dsn, HOSTS, extra=extras, catalog=CATALOG) as hosts:
        yield hosts


def capacity_of(host: str, **fields: object) -> Callable[[dict[str, Any]], bool]:
    return lambda e: (
        e.get("event") == "cluster_capacity_seen"
        and e.get("host_id") == host
        and all(e.get(k) == v for k, v in fields.items())
    )


async def ready_hosts(dsn: str, model: str) -> list[str]:
    rows = await db_rows(
        dsn, "SELECT host_id FROM modeld_replicas WHERE model = $1 AND state = 'READY'", model
    )
    return [r["host_id"] for r in rows]


async def refused(daemon: DaemonProc, model: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await daemon.stub.Route(pb.RouteRequest(model=model), timeout=LIMIT)
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION, caught.value
    return caught.value.details() or ""


async def test_labels_choose_the_host(tmp_path: Path, pg_dsn: str) -> None:  # noqa: F811
    extras = {
        "a": 'labels = { gpu = "a100" }\n',
        "b": 'labels = { gpu = "a100", zone = "b" }\n',
        "c": 'labels = { gpu = "h100" }\n',
    }
    async with cluster(tmp_path, pg_dsn, extras) as hosts:
        a = hosts["a"]
        for other in ("b", "c"):
            await a.wait_log(capacity_of(other, backends=["echo"]), LIMIT)
        reply = await a.stub.Route(pb.RouteRequest(model="h100"), timeout=LIMIT)
        assert reply.lease_id
        assert await ready_hosts(pg_dsn, "h100") == ["c"]
        details = await refused(a, "b200")
        assert "labels {gpu=b200} matched no host" in details
        assert "a {gpu=a100}" in details and "c {gpu=h100}" in details
        assert await ready_hosts(pg_dsn, "b200") == []


def gpus(free_gib: int) -> tuple[GpuView, ...]:
    """One 80 GiB device with `free_gib` free."""
    return (GpuView(0, "GPU-fake-0", "Fake", 80 * GIB, (80 - free_gib) * GIB),)


async def test_free_gpu_memory_chooses_the_host(tmp_path: Path, pg_dsn: str) -> None:  # noqa: F811
    free = {"a": 10, "b": 60, "c": 20}
    extras = {}
    for host, gib in free.items():
        fake = tmp_path / f"{host}.json"
        write_fake(fake, HostView(128 * GIB, 100 * GIB, gpus(gib)))
        extras[host] = f'[resources]\nfake_path = "{fake}"\n'
    async with cluster(tmp_path, pg_dsn, extras) as hosts:
        a = hosts["a"]
        for other in ("b", "c"):
            await a.wait_log(capacity_of(other, gpu_total=[80 * GIB]), LIMIT)
        # Only b has 40 GiB free; a, where the Route came in, has 10.
        reply = await a.stub.Route(pb.RouteRequest(model="big"), timeout=LIMIT)
        assert reply.lease_id
        assert await ready_hosts(pg_dsn, "big") == ["b"]
        details = await refused(a, "huge")
        assert "memory estimate 100.0 GiB is larger than any host's device" in details
        assert "80.0 GiB" in details
        assert await ready_hosts(pg_dsn, "huge") == []
