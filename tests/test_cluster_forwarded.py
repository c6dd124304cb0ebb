"""Forwarded calls between real daemons: a Route and its Release reach the owner, and
a forwarded marker sent by a client that is not a modeld (in the message's
`forwarded` field, unary or on a RouteStream, or as `modeld-forwarded` metadata) is
read alike: the call is answered as forwarded."""

from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from cluster_proc import load_seen, running_cluster
from daemon_proc import DaemonProc
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.cluster.marker import PLAIN, Marker

pytestmark = pytest.mark.timeout(150)


async def held(daemon: DaemonProc) -> int:
    reply = await daemon.stub.ListReplicas(
        pb.ListReplicasRequest(model="echo", local=True), timeout=5
    )
    return sum(r.in_flight for r in reply.replicas)


async def over_stream(
    daemon: DaemonProc, requests: Sequence[pb.RouteStreamRequest]
) -> dict[int, pb.RouteStreamResponse]:
    """Each request's answer on one RouteStream, by id."""
    call = daemon.stub.RouteStream()
    for request in requests:
        await call.write(request)
    await call.done_writing()
    return {answer.id: answer async for answer in call}


Metadata = tuple[tuple[str, str], ...]


def mark(how: str, marker: str) -> tuple[str, Metadata]:
    """(the message's `forwarded`, the call's metadata) that carry `marker` as `how` says."""
    return (marker, ()) if how == "field" else ("", (("modeld-forwarded", marker),))


async def unary(daemon: DaemonProc, how: str, lease_id: str, replica: str) -> list[str]:
    """Release and RenewLease of `lease_id` and a Route naming `replica`, each marked
    forwarded as `how` says: what each ended with ("released", "kept", a status name)."""
    field, md = mark(how, PLAIN)
    release = await daemon.stub.Release(
        pb.ReleaseRequest(lease_id=lease_id, forwarded=field), metadata=md, timeout=10
    )
    out = ["released" if release.released else "kept"]
    route_field, route_md = mark(how, replica)
    for call, request, metadata in (
        (daemon.stub.RenewLease, pb.RenewLeaseRequest(lease_id=lease_id, forwarded=field), md),
        (daemon.stub.Route, pb.RouteRequest(model="echo", forwarded=route_field), route_md),
    ):
        try:
            await call(request, metadata=metadata, timeout=10)
            out.append("OK")
        except grpc.aio.AioRpcError as exc:
            out.append(exc.code().name)
    return out


async def test_forwarded_calls_reach_the_owner_and_a_clients_marker_is_read_alike(
    tmp_path: Path, pg_dsn: str
) -> None:
    async with running_cluster(tmp_path, pg_dsn, ["a", "b"]) as hosts:
        a, b = hosts["a"], hosts["b"]
        replica = await load_seen(a, "b")
        lease = await a.stub.Route(pb.RouteRequest(model="echo"), timeout=10)
        assert lease.lease_id.startswith("b~") and lease.replica_id == replica.id
        assert await held(b) == 1
        # a is not the owner: a marked Release is not sent on (its lease stays held),
        # a marked RenewLease finds no lease, a marked Route no replica of a's.
        marked = Marker(replica.id, replica.restarts).encode()
        expected = ["kept", "NOT_FOUND", "NOT_FOUND"]
        assert await unary(a, "metadata", lease.lease_id, marked) == expected
        assert await unary(a, "field", lease.lease_id, marked) == expected
        answers = await over_stream(
            a,
            [
                pb.RouteStreamRequest(
                    id=1, release=pb.ReleaseRequest(lease_id=lease.lease_id, forwarded=PLAIN)
                ),
                pb.RouteStreamRequest(
                    id=2, renew=pb.RenewLeaseRequest(lease_id=lease.lease_id, forwarded=PLAIN)
                ),
                pb.RouteStreamRequest(id=3, route=pb.RouteRequest(model="echo", forwarded=marked)),
            ],
        )
        assert not answers[1].release.released
        assert [answers[i].error.code for i in (2, 3)] == ["NOT_FOUND", "NOT_FOUND"]
        assert "route elsewhere" in answers[3].error.message
        assert await held(b) == 1
        # At the owner, the marker in the message names its replica: it leases.
        granted = await b.stub.Route(pb.RouteRequest(model="echo", forwarded=marked), timeout=10)
        assert granted.lease_id.startswith("b~") and await held(b) == 2
        for each in (lease, granted):
            reply = await a.stub.Release(pb.ReleaseRequest(lease_id=each.lease_id), timeout=10)
            assert reply.released
        assert await held(b) == 0
