"""Affinity keys end to end: the real daemon, three real echo replicas, the Python client."""

from collections import Counter
from pathlib import Path

import grpc
import pytest

from daemon_proc import running_daemon
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.client import AsyncClient, InvalidArgument

CATALOG = """
[backends.echo]
command = ["{python}", "-m", "modeld.backends.echo", "--addr", "{addr}"]
stop_grace = "300ms"
[models.trio]
backend = "echo"
max_replicas = 3
"""
KEYS = [f"conversation-{i}" for i in range(300)]


async def homes(client: AsyncClient, keys: list[str]) -> dict[str, str]:
    """Each key's replica, one Route and Release at a time (nothing held meanwhile)."""
    out: dict[str, str] = {}
    for key in keys:
        lease = await client.route("trio", affinity_key=key)
        out[key] = lease.replica_id
        await client.release(lease)
    return out


async def test_keys_stick_spread_are_bounded_and_mostly_stay_when_a_replica_goes(
    tmp_path: Path,
) -> None:
    async with running_daemon(tmp_path, CATALOG) as d, AsyncClient(d.addr) as client:
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
