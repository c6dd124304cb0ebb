"""Forwarded Route, Release and RenewLease over one RouteStream per peer (cluster/peerstream.py,
Peers in cluster/forward.py), against a fake owner: what it receives, what a broken
stream does to the calls on it, and a Route whose caller gave up."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from modeld import config
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.cluster.forward import PeerFailed, Peers
from modeld.cluster.marker import PLAIN, Marker
from modeld.errors import NotFound, PeerUnreachable, Unavailable

MARKED = Marker("r1", 0, 3).encode()
PICKED = Marker("r1", 0).encode()
ENV = {"MODELD_CLUSTER_DSN": "postgresql://db/x"}


class FakeOwner:
    """A RouteStream server that records what it gets; a Route is answered at once,
    or, with `hold` set, when `go` is set."""

    def __init__(self) -> None:
        self.received: list[pb.RouteStreamRequest] = []
        self.streams = 0
        self.arrived = asyncio.Condition()
        self.hold = False
        self.go = asyncio.Event()
        self.server = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(
            self._serve,
            request_deserializer=pb.RouteStreamRequest.FromString,
            response_serializer=pb.RouteStreamResponse.SerializeToString,
        )
        generic = grpc.method_handlers_generic_handler(
            "modeld.v1.ModelControl", {"RouteStream": handler}
        )
        self.server.add_generic_rpc_handlers((generic,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def _serve(
        self, requests: AsyncIterator[pb.RouteStreamRequest], context: Any
    ) -> AsyncIterator[pb.RouteStreamResponse]:
        self.streams += 1
        answers: asyncio.Queue[pb.RouteStreamResponse] = asyncio.Queue()
        held: set[asyncio.Task[None]] = set()

        async def later(request: pb.RouteStreamRequest) -> None:
            await self.go.wait()
            answers.put_nowait(self._answer(request))

        async def read() -> None:
            async for request in requests:
                async with self.arrived:
                    self.received.append(request)
                    self.arrived.notify_all()
                if request.WhichOneof("call") == "route" and self.hold:
                    held.add(asyncio.create_task(later(request)))
                else:
                    answers.put_nowait(self._answer(request))

        reader = asyncio.create_task(read())
        try:
            while True:
                yield await answers.get()
        finally:
            for task in (reader, *held):
                task.cancel()

    def _answer(self, request: pb.RouteStreamRequest) -> pb.RouteStreamResponse:
        kind = request.WhichOneof("call")
        if kind == "route":
            route = pb.RouteResponse(lease_id=f"b~{request.id}", replica_id="r1", owner_in_flight=1)
            return pb.RouteStreamResponse(id=request.id, route=route)
        if kind == "release":
            return pb.RouteStreamResponse(id=request.id, release=pb.ReleaseResponse(released=True))
        error = pb.StreamError(code="NOT_FOUND", message="lease 'b~9' is not held")
        return pb.RouteStreamResponse(id=request.id, error=error)

    async def wait_for(self, count: int) -> None:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.received) >= count), 20)


class Cut:
    """A TCP relay to `port`; `cut` aborts its connections, as a peer that dies does."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._links: set[asyncio.Transport] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._port)
        pairs = ((reader, up_writer), (up_reader, writer))
        for w in (writer, up_writer):
            self._links.add(w.transport)  # type: ignore[arg-type]
        await asyncio.gather(*(_pipe(r, w) for r, w in pairs), return_exceptions=True)

    def cut(self) -> None:
        for transport in self._links:
            transport.abort()
        self._links.clear()

    def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


@pytest.fixture
async def owner() -> AsyncIterator[FakeOwner]:
    fake = FakeOwner()
    await fake.server.start()
    yield fake
    fake.go.set()
    await fake.server.stop(None)


@pytest.fixture
async def peers() -> AsyncIterator[Peers]:
    forwarder = Peers(config.load(None, env=ENV))
    yield forwarder
    await forwarder.close()


async def test_forwarded_calls_share_one_stream_and_carry_the_marker(
    owner: FakeOwner, peers: Peers
) -> None:
    address = f"127.0.0.1:{owner.port}"
    grant = await peers.route("b", address, "echo", MARKED, 5.0, key="k")
    assert (grant.lease_id, grant.replica_id, grant.owner_in_flight) == ("b~1", "r1", 1)
    assert await peers.release("b", address, grant.lease_id, "OK", 5.0)
    with pytest.raises(NotFound, match="host b: lease 'b~9' is not held"):
        await peers.renew("b", address, "b~9", 5.0)
    route, release, renew = owner.received
    assert (route.route.model, route.route.affinity_key) == ("echo", "k")
    # The marker travels in the message, as the metadata marker of a unary call.
    assert route.route.forwarded == MARKED
    assert (release.release.lease_id, release.release.forwarded) == ("b~1", PLAIN)
    assert renew.renew.forwarded == PLAIN
    assert owner.streams == 1


async def test_a_peer_that_dies_fails_the_calls_on_its_stream_and_the_next_reconnects(
    owner: FakeOwner, peers: Peers
) -> None:
    relay = Cut(owner.port)
    address = await relay.start()
    try:
        owner.hold = True
        route = asyncio.create_task(peers.route("b", address, "echo", PICKED, 30.0))
        release = asyncio.create_task(peers.release("b", address, "b~7", "OK", 30.0))
        await owner.wait_for(2)
        relay.cut()
        # As a unary call to a peer that died: the Route goes elsewhere, the Release
        # is told that no modeld answered; both at once, not at their 30 s limit.
        with pytest.raises(PeerFailed, match="UNAVAILABLE"):
            await asyncio.wait_for(route, 20)
        with pytest.raises(PeerUnreachable, match="host b: "):
            await asyncio.wait_for(release, 20)
        owner.hold = False
        grant = await peers.route("b", address, "echo", PICKED, 10.0)
        assert grant.replica_id == "r1"
        assert owner.streams == 2
    finally:
        relay.close()


async def test_a_route_whose_caller_gave_up_is_released_when_granted(
    owner: FakeOwner, peers: Peers
) -> None:
    address = f"127.0.0.1:{owner.port}"
    owner.hold = True
    route = asyncio.create_task(peers.route("b", address, "echo", PICKED, 30.0))
    await owner.wait_for(1)
    route.cancel()
    with pytest.raises(asyncio.CancelledError):
        await route
    owner.go.set()
    # The lease the owner granted after all is released, on the same stream.
    await owner.wait_for(2)
    orphan = owner.received[1]
    assert orphan.release.lease_id == f"b~{owner.received[0].id}"
    assert orphan.release.forwarded == PLAIN


async def test_forget_cuts_the_calls_on_the_stream_of_a_departed_host(
    owner: FakeOwner, peers: Peers
) -> None:
    address = f"127.0.0.1:{owner.port}"
    owner.hold = True
    route = asyncio.create_task(peers.route("b", address, "echo", PICKED, 30.0))
    release = asyncio.create_task(peers.release("b", address, "b~7", "OK", 30.0))
    await owner.wait_for(2)
    peers.forget(address)
    with pytest.raises(PeerFailed, match="left the cluster"):
        await asyncio.wait_for(route, 20)
    with pytest.raises(Unavailable, match=r"host b: .* left the cluster") as cut:
        await asyncio.wait_for(release, 20)
    assert not isinstance(cut.value, PeerUnreachable)
