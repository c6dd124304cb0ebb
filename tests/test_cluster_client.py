"""modeld.client in a cluster: a lease's Release and RenewLease go straight to its
owner (one hop fewer than through the modeld that forwarded the Route), and through
the connected modeld when the owner cannot be reached. Two real daemons, real
PostgreSQL."""

import asyncio
import dataclasses
from pathlib import Path

from backend_proc import free_port
from cluster_proc import load_seen, running_cluster
from modeld.client import AsyncClient, Client


async def test_release_and_renew_reach_the_owner_even_with_the_forwarder_gone(
    tmp_path: Path, pg_dsn: str
) -> None:
    async with running_cluster(tmp_path, pg_dsn, ["a", "b"]) as hosts:
        a, b = hosts["a"], hosts["b"]
        await load_seen(a, "b")
        sync_client, async_client = Client(a.addr, timeout=30), AsyncClient(a.addr, timeout=30)
        try:
            held = await asyncio.to_thread(sync_client.route, "echo")
            held_async = await async_client.route("echo")
            assert {held.owner_address, held_async.owner_address} == {b.addr}
            # With a gone, only a call straight to b can answer.
            await a.stop()
            assert await asyncio.to_thread(sync_client.renew, held) > 0
            assert await async_client.renew(held_async) > 0
            assert await asyncio.to_thread(sync_client.release, held)
            assert await async_client.release(held_async)
        finally:
            sync_client.close()
            await async_client.close()


async def test_an_unreachable_owner_is_asked_through_the_connected_modeld(
    tmp_path: Path, pg_dsn: str
) -> None:
    async with running_cluster(tmp_path, pg_dsn, ["a", "b"]) as hosts:
        a = hosts["a"]
        await load_seen(a, "b")
        async with AsyncClient(a.addr, timeout=30) as client:
            held = await client.route("echo")
            # An owner address nothing listens on: the forwarder (a) still reaches b.
            astray = dataclasses.replace(held, owner_address=f"127.0.0.1:{free_port()}")
            assert await client.renew(astray) > 0
            assert await client.release(astray)
            assert not await client.release(held)
