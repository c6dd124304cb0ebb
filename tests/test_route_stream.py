"""RouteStream against the real daemon and real echo backends.

One stream carries Route, Release and RenewLease; answers carry their request's id
and a call that waits (a cold start held at a gate) does not hold back the others.
Failed calls answer with the unary call's status name and text; a broken stream
releases nothing (its lease runs out by its TTL); a stopping daemon ends every
stream with UNAVAILABLE. The Python clients use it with `stream=True`.
"""

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from daemon_proc import ECHO_CATALOG, DaemonProc, running_daemon
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.client import AsyncClient, Client, NotFound

WAIT_S = 20.0
GATED = str(Path(__file__).with_name("gated_backend.py"))


def catalog(gate: Path) -> str:
    return ECHO_CATALOG + (
        f'[backends.gated]\ncommand = ["{sys.executable}", "{GATED}", "{gate}", '
        '"--addr", "{addr}"]\n[models.gated]\nbackend = "gated"\n'
        '[models.short]\nbackend = "echo"\nlease_ttl = "1s"\n'
    )


class Stream:
    """A raw RouteStream: send messages, read answers by id, in the order they come."""

    def __init__(self, d: DaemonProc) -> None:
        self.call: Any = d.stub.RouteStream()
        self.order: list[int] = []

    async def send(self, call_id: int, **call: Any) -> None:
        await self.call.write(pb.RouteStreamRequest(id=call_id, **call))

    async def answer(self) -> pb.RouteStreamResponse:
        answer = await asyncio.wait_for(self.call.read(), WAIT_S)
        assert answer is not grpc.aio.EOF, "the stream ended"
        self.order.append(answer.id)
        return answer  # type: ignore[no-any-return]

    async def ask(self, call_id: int, **call: Any) -> pb.RouteStreamResponse:
        await self.send(call_id, **call)
        answer = await self.answer()
        assert answer.id == call_id
        return answer


async def unary_error(call: Any) -> tuple[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    return failed.value.code().name, failed.value.details() or ""


async def in_flight(d: DaemonProc, model: str) -> tuple[int, int]:
    reply = await d.stub.ListReplicas(pb.ListReplicasRequest(model=model), timeout=WAIT_S)
    return sum(r.in_flight for r in reply.replicas), sum(r.live_leases for r in reply.replicas)


# One daemon for the module (the stopping test starts its own), on the module's loop.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[DaemonProc, Path]]:
    tmp_path = tmp_path_factory.mktemp("route-stream")
    gate = tmp_path / "gate"
    gate.mkdir()
    async with running_daemon(tmp_path, catalog(gate)) as d:
        yield d, gate


async def test_calls_answer_by_id_in_any_order_with_the_unary_statuses(
    shared: tuple[DaemonProc, Path],
) -> None:
    d, gate = shared
    s = Stream(d)
    leased = await s.ask(1, route=pb.RouteRequest(model="echo"))
    lease_id = leased.route.lease_id
    assert leased.WhichOneof("result") == "route" and lease_id
    assert await in_flight(d, "echo") == (1, 1)
    renewed = await s.ask(2, renew=pb.RenewLeaseRequest(lease_id=lease_id))
    assert renewed.renew.lease_expires_at.seconds >= leased.route.lease_expires_at.seconds

    # Failures: the unary call's status name and text, and the stream goes on.
    for call_id, call, unary in [
        (3, {"route": pb.RouteRequest(model="nope")}, d.stub.Route(pb.RouteRequest(model="nope"))),
        (
            4,
            {"renew": pb.RenewLeaseRequest(lease_id="not-a-lease")},
            d.stub.RenewLease(pb.RenewLeaseRequest(lease_id="not-a-lease")),
        ),
        (5, {"release": pb.ReleaseRequest()}, d.stub.Release(pb.ReleaseRequest())),
    ]:
        failed = await s.ask(call_id, **call)
        assert failed.WhichOneof("result") == "error"
        assert (failed.error.code, failed.error.message) == await unary_error(unary)
    assert (await s.ask(6)).error.code == "INVALID_ARGUMENT"
    unknown = await s.ask(7, release=pb.ReleaseRequest(lease_id="not-a-lease"))
    assert unknown.WhichOneof("result") == "release" and not unknown.release.released

    # A Route waiting for a start held at its gate answers after calls sent later.
    await s.send(8, route=pb.RouteRequest(model="gated"))
    await s.send(9, release=pb.ReleaseRequest(lease_id=lease_id))
    released = await s.answer()
    assert released.id == 9 and released.release.released
    (gate / "open").write_text("")
    cold = await s.answer()
    assert cold.id == 8 and cold.route.cold_start
    assert s.order[-2:] == [9, 8]
    await s.ask(10, release=pb.ReleaseRequest(lease_id=cold.route.lease_id))
    await s.call.done_writing()
    assert await s.call.read() is grpc.aio.EOF
    assert await s.call.code() == grpc.StatusCode.OK
    assert await in_flight(d, "echo") == (0, 0)


async def test_the_python_clients_lease_over_the_stream(shared: tuple[DaemonProc, Path]) -> None:
    d, _ = shared
    async with AsyncClient(d.addr, stream=True) as client:
        async with client.lease("echo") as lease:
            assert await in_flight(d, "echo") == (1, 1)
            await client.renew(lease)
        with pytest.raises(NotFound, match="'nope' is not defined"):
            await client.route("nope")
    assert await in_flight(d, "echo") == (0, 0)

    def sync_leases() -> list[str]:
        with Client(d.addr, stream=True) as client:
            ids = []
            for _ in range(3):
                with client.lease("echo") as lease:
                    client.renew(lease)
                    ids.append(lease.lease_id)
            with pytest.raises(NotFound):
                client.route("nope")
            return ids

    assert len(set(await asyncio.to_thread(sync_leases))) == 3
    assert await in_flight(d, "echo") == (0, 0)


async def test_a_cancelled_stream_releases_nothing_and_its_lease_expires(
    shared: tuple[DaemonProc, Path],
) -> None:
    d, _ = shared
    events = d.stub.WatchEvents(pb.WatchEventsRequest(model="short"))
    s = Stream(d)
    leased = await s.ask(1, route=pb.RouteRequest(model="short"))
    s.call.cancel()
    # The daemon has seen the stream end (gRPC ends its requests as if closed).
    await d.wait_log(lambda e: (e.get("event"), e.get("method")) == ("rpc", "RouteStream"))
    assert await in_flight(d, "short") == (1, 1)

    async def expired() -> None:
        async for event in events:
            if event.reason == "lease_expired" and event.replica_id == leased.route.replica_id:
                return

    await asyncio.wait_for(expired(), WAIT_S)
    events.cancel()
    assert await in_flight(d, "short") == (0, 0)
    code, _ = await unary_error(
        d.stub.RenewLease(pb.RenewLeaseRequest(lease_id=leased.route.lease_id))
    )
    assert code == "NOT_FOUND"


async def test_a_stopping_daemon_ends_its_streams_with_unavailable(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    async with running_daemon(tmp_path, catalog(gate)) as d:
        s = Stream(d)
        await s.ask(1, route=pb.RouteRequest(model="echo"))
        events = d.stub.WatchEvents(pb.WatchEventsRequest(model="gated"))
        # One call still waiting (a start held at its gate) when the daemon stops.
        await s.send(2, route=pb.RouteRequest(model="gated"))
        starting = await asyncio.wait_for(events.read(), WAIT_S)
        assert starting.to_state == pb.STARTING
        events.cancel()
        stopping = asyncio.create_task(d.stop())
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(s.answer(), WAIT_S)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (ended.value.details() or "")
        assert await stopping == 0
