"""`parallel`, scale-out on load and the fair queue, against the real daemon and echo backends.

One daemon serves the whole module; each test uses its own model. Waits are on the
daemon's own log (`route_queued` names a waiter's position as it joins the queue) or
on gRPC calls with deadlines, never on sleeps.
"""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio

from daemon_proc import DaemonProc, running_daemon, starts_recorded
from modeld._proto.modeld.v1 import modeld_pb2 as pb

pytestmark = pytest.mark.asyncio(loop_scope="module")

ECHO = '"{python}", "-m", "modeld.backends.echo", "--addr", "{addr}"'
CATALOG = f"""
[backends.echo]
command = [{ECHO}]
stop_grace = "300ms"
[models.pair]
backend = "echo"
parallel = 2
[models.burst]
backend = "echo"
parallel = 2
max_replicas = 3
[models.fifo]
backend = "echo"
parallel = 1
queue_max = 3
"""
Call = grpc.aio.UnaryUnaryCall  # type: ignore[type-arg]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def d(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DaemonProc]:
    async with running_daemon(tmp_path_factory.mktemp("queue"), CATALOG) as daemon:
        yield daemon


def route(d: DaemonProc, model: str, timeout: float = 30.0) -> Call:
    return d.stub.Route(pb.RouteRequest(model=model), timeout=timeout)


async def release(d: DaemonProc, *leases: pb.RouteResponse) -> None:
    for lease in leases:
        assert (await d.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id))).released


async def listing(d: DaemonProc, model: str) -> pb.ListReplicasResponse:
    return await d.stub.ListReplicas(pb.ListReplicasRequest(model=model), timeout=10)


async def in_flight(d: DaemonProc, model: str) -> dict[str, int]:
    return {r.id: r.in_flight for r in (await listing(d, model)).replicas}


def joined(d: DaemonProc, model: str) -> int:
    """How many times a Route of `model` joined its queue (the daemon's log)."""
    return sum(1 for e in d.log if e.get("event") == "route_queued" and e.get("model") == model)


async def queued(d: DaemonProc, model: str, position: int) -> dict[str, Any]:
    """The log entry of the waiter that joined `model`'s queue at `position`."""
    return await d.wait_log(
        lambda e: (
            e.get("event") == "route_queued"
            and e.get("model") == model
            and e.get("position") == position
        )
    )


async def test_parallel_caps_the_leases_of_a_replica_and_the_queue_deadline_names_why(
    d: DaemonProc,
) -> None:
    first = await route(d, "pair")
    second = await route(d, "pair")
    assert first.replica_id == second.replica_id
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await route(d, "pair", timeout=3.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    message = info.value.details() or ""
    assert "'pair'" in message and "parallel = 2" in message, message
    assert "position 1" in message, message
    # max_replicas = 1: the queue, not a second replica; the cap held throughout.
    assert await in_flight(d, "pair") == {first.replica_id: 2}
    assert starts_recorded(d.config.parent, "pair") == 1
    listed = await listing(d, "pair")
    assert [(q.model, q.length) for q in listed.queues] == [("pair", 0)]
    await release(d, first, second)


async def test_a_full_replica_starts_one_more_per_shortage_never_a_storm(d: DaemonProc) -> None:
    held = [await route(d, "burst"), await route(d, "burst")]
    assert starts_recorded(d.config.parent, "burst") == 1
    go, four = asyncio.Event(), asyncio.Event()
    served: list[pb.RouteResponse] = []

    async def client() -> None:
        lease = await route(d, "burst")
        served.append(lease)
        if len(served) == 4:
            four.set()
        await go.wait()
        await release(d, lease)

    burst = [asyncio.ensure_future(client()) for _ in range(20)]
    # Each replica that fills while Routes still wait starts exactly one more (the burst
    # waits in the queue behind it), up to max_replicas = 3.
    await asyncio.wait_for(four.wait(), 30)
    # The whole burst joined the queue (the replicas it caused came up after).
    await d.wait_log(lambda _: joined(d, "burst") == 20)
    assert starts_recorded(d.config.parent, "burst") == 3
    listed = await listing(d, "burst")
    assert sorted(r.in_flight for r in listed.replicas) == [2, 2, 2], listed
    assert [q.length for q in listed.queues] == [16]
    go.set()
    await release(d, *held)
    await asyncio.wait_for(asyncio.gather(*burst), 30)
    assert len(served) == 20
    assert starts_recorded(d.config.parent, "burst") == 3
    assert set((await in_flight(d, "burst")).values()) == {0}


async def test_waiters_get_the_freed_slot_in_order_and_the_queue_is_bounded(
    d: DaemonProc,
) -> None:
    holder = await route(d, "fifo")
    waiters: list[Call] = []
    for position in (1, 2, 3):
        waiters.append(route(d, "fifo"))
        await queued(d, "fifo", position)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await route(d, "fifo", timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    message = info.value.details() or ""
    assert "'fifo'" in message and "queue_max = 3" in message, message
    # The second waiter gives up: it leaves no trace, and the third moves up.
    waiters[1].cancel()
    await d.wait_log(lambda e: e.get("event") == "route_queue_left" and e.get("model") == "fifo")
    assert [q.length for q in (await listing(d, "fifo")).queues] == [2]
    await release(d, holder)
    first = await waiters[0]
    assert first.replica_id == holder.replica_id
    assert not waiters[2].done()
    await release(d, first)
    third = await waiters[2]
    assert await in_flight(d, "fifo") == {holder.replica_id: 1}
    await release(d, third)
    listed = await listing(d, "fifo")
    assert [(r.in_flight, r.live_leases) for r in listed.replicas] == [(0, 0)]
    assert [q.length for q in listed.queues] == [0]
