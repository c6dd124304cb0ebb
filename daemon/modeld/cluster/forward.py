"""Calls from this modeld to another: forwarded Route, Release, RenewLease and Load.

Route, Release and RenewLease go over one RouteStream per peer (peerstream.py):
no call setup per forwarded call, which is what a forward costs on top of a
direct Route. Load, rare and long, is one unary call. Every forwarded call carries
a marker (marker.py), in its message's `forwarded` field on the stream or as
`modeld-forwarded` metadata on a unary call, so the owner answers from its own
memory and never forwards again: at most one hop. Calls use this
daemon's TLS settings and the cluster token, over one cached channel per peer,
closed (with its stream) when the peer leaves the view. A peer's status comes back
as the same domain error, prefixed with the host it came from.
"""

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from modeld import errors
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc
from modeld.cluster.marker import PLAIN
from modeld.cluster.peerstream import PeerStream, StreamEnded
from modeld.config import Config
from modeld.config.secrets import load_tokens
from modeld.errors import ConfigError
from modeld.info import FORWARDED, Grant, ReplicaInfo
from modeld.netaddr import is_loopback, split_host_port
from modeld.state import ReplicaState

ERRORS: dict[grpc.StatusCode, type[errors.ModeldError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
}
# A forwarded Route that ends in one of these is retried on another replica.
RETRY_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


# Forwarded calls are never retried by gRPC itself (the forwarder picks another
# replica), and need no channelz bookkeeping: both cost on every call.
FAST = (("grpc.enable_retries", 0), ("grpc.enable_channelz", 0))
LEFT = "the call was cut: the host left the cluster view"


@dataclass(frozen=True, slots=True)
class Load:
    """A Load sent to another modeld: `replicas` of `model` on `host_id`, at `address`."""

    model: str
    replicas: int
    host_id: str
    address: str


class PeerFailed(Exception):
    """A peer answered with a status a forwarder may retry elsewhere."""

    def __init__(self, host: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"host {host}: {code.name}: {details}")
        self.code = code


@dataclass(frozen=True, slots=True)
class _Peer:
    channel: grpc.aio.Channel
    stub: pb_grpc.ModelControlStub
    stream: PeerStream[pb.RouteStreamRequest, pb.RouteStreamResponse]


class _Failed(Exception):
    """A call on a peer's stream failed as the unary call would have, with this status."""

    def __init__(self, code: grpc.StatusCode, details: str, *, answered: bool = True) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.answered = answered

    def domain(self, host: str) -> errors.ModeldError:
        return _error(host, self.code, self.details, answered=self.answered)


class Peers:
    """One channel (its stub, its RouteStream) per peer address, kept while the peer
    is in the view: `forget` closes it once the host has left."""

    def __init__(self, config: Config) -> None:
        cluster = config.cluster
        assert cluster is not None
        self._creds = _channel_credentials(config)
        if self._creds is None and not cluster.allow_insecure_remote:
            host, _ = split_host_port(cluster.advertise)
            if not is_loopback(host):
                raise ConfigError(
                    f"cluster.advertise: {cluster.advertise} is reached by other hosts, but "
                    "calls between modelds would be plaintext; set tls_cert and tls_key, or "
                    "cluster.allow_insecure_remote = true"
                )
        token = load_tokens(cluster.token_file)[0].decode() if cluster.token_file else None
        self._auth: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._peers: dict[str, _Peer] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._limit = config.max_message_bytes

    def _peer(self, address: str) -> _Peer:
        # The stub is cached with its channel: building one creates a callable per RPC.
        peer = self._peers.get(address)
        if peer is None:
            options = [("grpc.max_receive_message_length", self._limit), *FAST]
            channel = (
                grpc.aio.secure_channel(address, self._creds, options)
                if self._creds is not None
                else grpc.aio.insecure_channel(address, options)
            )
            stub = pb_grpc.ModelControlStub(channel)  # type: ignore[no-untyped-call]
            auth = self._auth
            stream = PeerStream[pb.RouteStreamRequest, pb.RouteStreamResponse](
                lambda requests: stub.RouteStream(requests, metadata=auth),
                _orphan_release,
                closed_reason=LEFT,
            )
            peer = self._peers[address] = _Peer(channel, stub, stream)
        return peer

    def addresses(self) -> set[str]:
        return set(self._peers)

    def forget(self, address: str) -> None:
        """Close the channel to a peer that left; calls still on it end as cut."""
        peer = self._peers.pop(address, None)
        if peer is None:
            return
        task = asyncio.get_running_loop().create_task(_close(peer))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def route(
        self, host: str, address: str, model: str, marker: str, limit_s: float, *, key: str = ""
    ) -> Grant:
        route = pb.RouteRequest(model=model, affinity_key=key, forwarded=marker)
        try:
            reply: pb.RouteResponse = await self._stream(
                address, pb.RouteStreamRequest(route=route), limit_s
            )
        except _Failed as exc:
            if exc.code in RETRY_CODES:
                raise PeerFailed(host, exc.code, exc.details) from None
            raise exc.domain(host) from None
        return _grant(reply)

    async def release(
        self, host: str, address: str, lease_id: str, outcome: str, limit_s: float
    ) -> bool:
        release = pb.ReleaseRequest(lease_id=lease_id, outcome=outcome, forwarded=PLAIN)
        request = pb.RouteStreamRequest(release=release)
        reply: pb.ReleaseResponse = await self._answered(host, address, request, limit_s)
        return reply.released

    async def renew(self, host: str, address: str, lease_id: str, limit_s: float) -> float:
        """The lease's new expiry, wall-clock seconds."""
        renew = pb.RenewLeaseRequest(lease_id=lease_id, forwarded=PLAIN)
        request = pb.RouteStreamRequest(renew=renew)
        reply: pb.RenewLeaseResponse = await self._answered(host, address, request, limit_s)
        return _wall(reply.lease_expires_at)

    async def _answered(
        self, host: str, address: str, request: pb.RouteStreamRequest, limit_s: float
    ) -> Any:
        """`_stream`, with a failure raised as the domain error the peer's status names."""
        try:
            return await self._stream(address, request, limit_s)
        except _Failed as exc:
            raise exc.domain(host) from None

    async def _stream(self, address: str, request: pb.RouteStreamRequest, limit_s: float) -> Any:
        """The unary reply `request`'s call gets over the peer's RouteStream; `_Failed`
        with the status that call would have ended with."""
        try:
            answer = await self._peer(address).stream.call(request, limit_s)
        except grpc.aio.AioRpcError as exc:
            raise _Failed(exc.code(), exc.details() or "", answered=_answered(exc)) from None
        except TimeoutError:
            raise _Failed(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer in {limit_s:g} s"
            ) from None
        except StreamEnded as exc:
            # As a unary call cut by `forget` ends: UNAVAILABLE, told by this modeld.
            raise _Failed(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        kind = answer.WhichOneof("result")
        if kind == "error":
            code = grpc.StatusCode.__members__.get(answer.error.code, grpc.StatusCode.UNKNOWN)
            raise _Failed(code, answer.error.message)
        if kind is None:
            raise _Failed(grpc.StatusCode.UNKNOWN, f"answer {answer.id} carries no result")
        return getattr(answer, kind)

    async def load(self, load: Load, limit_s: float, marker: str = PLAIN) -> list[ReplicaInfo]:
        """`marker`: a claim's (coldstart.py), so that the target publishes under it."""
        host = load.host_id
        request = pb.LoadRequest(model=load.model, replicas=load.replicas, host=host)
        try:
            reply: pb.LoadResponse = await self._peer(load.address).stub.Load(
                request, metadata=((FORWARDED, marker), *self._auth), timeout=limit_s
            )
        except grpc.aio.AioRpcError as exc:
            raise _domain(host, exc) from None
        except asyncio.CancelledError:
            _reraise_if_cancelled()
            raise errors.Unavailable(f"host {host}: {LEFT}") from None
        return [_replica(r) for r in reply.replicas]

    async def close(self) -> None:
        for peer in self._peers.values():
            await _close(peer)
        self._peers.clear()
        if self._closing:
            await asyncio.gather(*self._closing)


async def _close(peer: _Peer) -> None:
    await peer.stream.close()
    await peer.channel.close(None)


def _wall(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def _optional_wall(ts: Timestamp) -> float | None:
    return _wall(ts) if ts.seconds or ts.nanos else None


def _orphan_release(answer: pb.RouteStreamResponse) -> pb.RouteStreamRequest | None:
    """The Release of a lease granted to a caller that is no longer waiting."""
    if answer.WhichOneof("result") != "route" or not answer.route.lease_id:
        return None
    # Marked forwarded, as every call this modeld sends: the owner never forwards it on.
    return pb.RouteStreamRequest(
        release=pb.ReleaseRequest(lease_id=answer.route.lease_id, forwarded=PLAIN)
    )


def _grant(reply: pb.RouteResponse) -> Grant:
    return Grant(
        lease_id=reply.lease_id,
        replica_id=reply.replica_id,
        address=reply.address,
        protocol="http" if reply.protocol == pb.HTTP else "grpc",
        expires_wall=_wall(reply.lease_expires_at),
        cold_start=reply.cold_start,
        owner_address=reply.owner_address,
        owner_in_flight=reply.owner_in_flight,
        declined=reply.declined,
    )


def _replica(msg: pb.Replica) -> ReplicaInfo:
    """A replica another modeld started for a Load, as its answer describes it."""
    return ReplicaInfo(
        id=msg.id,
        model=msg.model,
        backend=msg.backend,
        state=ReplicaState(pb.ReplicaState.Name(msg.state)),
        address=msg.address,
        pid=msg.pid or None,
        in_flight=msg.in_flight,
        last_used=_optional_wall(msg.last_used),
        started_at=_optional_wall(msg.started_at),
        ready_at=_optional_wall(msg.ready_at),
        gpu=msg.gpu,
        last_error=msg.last_error,
        restarts=msg.restarts,
        memory=msg.memory,
        last_probe_ok=msg.last_probe_ok,
        last_probe_at=_optional_wall(msg.last_probe_at),
        node_id=msg.node_id,
        live_leases=msg.live_leases,
        suspect=msg.suspect,
        load_waiting=msg.load_waiting if msg.load_reported else None,
        load_running=msg.load_running,
        kv_cache_usage=msg.kv_cache_usage if msg.kv_cache_usage >= 0 else None,
    )


def _reraise_if_cancelled() -> None:
    """A call on a channel `forget` closed ends in CancelledError although nobody
    cancelled this task: only a real cancellation of the task goes on as one."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _domain(host: str, exc: grpc.aio.AioRpcError) -> errors.ModeldError:
    return _error(host, exc.code(), exc.details() or "", answered=_answered(exc))


def _error(host: str, code: grpc.StatusCode, details: str, *, answered: bool) -> errors.ModeldError:
    kind = ERRORS.get(code, errors.Unavailable)
    if kind is errors.Unavailable and not answered:
        kind = errors.PeerUnreachable
    return kind(f"host {host}: {details or code.name}")


def _answered(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a modeld sent this status (its refusals carry RETRY_KEY), rather than
    gRPC reporting that the call never reached one or lost it."""
    trailing: Any = exc.trailing_metadata()
    return any(key == errors.RETRY_KEY for key, _ in trailing or ())


def _channel_credentials(config: Config) -> grpc.ChannelCredentials | None:
    if not config.tls_cert:
        return None
    # Peers present certificates signed by the cluster's CA (tls_client_ca); with mutual
    # TLS this daemon's own certificate is its client certificate.
    roots = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_channel_credentials(
        root_certificates=roots,
        private_key=Path(config.tls_key).read_bytes(),
        certificate_chain=Path(config.tls_cert).read_bytes(),
    )
