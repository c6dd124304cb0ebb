"""Calls from this modeld to another: forwarded Route, Release, RenewLease and Load.

Every forwarded call carries `modeld-forwarded` metadata (for a Route: the replica
id and generation the forwarder picked), so the owner answers from its own
memory and never forwards again: at most one hop. Calls use this daemon's TLS
settings and the cluster token. A peer's status comes back as the same domain
error, prefixed with the host it came from.
"""

from pathlib import Path

import grpc

from modeld import errors
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc
from modeld.api.security import load_tokens
from modeld.config import Config
from modeld.errors import ConfigError
from modeld.netaddr import is_loopback, split_host_port

FORWARDED = "modeld-forwarded"
ERRORS: dict[grpc.StatusCode, type[errors.ModeldError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
}
# A forwarded Route that ends in one of these is retried on another replica.
RETRY_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}
)


class PeerFailed(Exception):
    """A peer answered with a status a forwarder may retry elsewhere."""

    def __init__(self, host: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"host {host}: {code.name}: {details}")
        self.code = code


def forwarded_marker(metadata: object) -> str | None:
    """The `modeld-forwarded` value of a call's invocation metadata, if any."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == FORWARDED:
            return value if isinstance(value, str) else value.decode()
    return None


class Peers:
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
        self._auth = (("authorization", f"Bearer {token}"),) if token else ()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._limit = config.max_message_bytes

    def _stub(self, address: str) -> pb_grpc.ModelControlStub:
        channel = self._channels.get(address)
        if channel is None:
            options = [("grpc.max_receive_message_length", self._limit)]
            channel = (
                grpc.aio.secure_channel(address, self._creds, options)
                if self._creds is not None
                else grpc.aio.insecure_channel(address, options)
            )
            self._channels[address] = channel
        return pb_grpc.ModelControlStub(channel)  # type: ignore[no-untyped-call]

    def _md(self, marker: str) -> tuple[tuple[str, str], ...]:
        return ((FORWARDED, marker), *self._auth)

    async def route(
        self, host: str, address: str, model: str, marker: str, limit_s: float
    ) -> pb.RouteResponse:
        try:
            reply: pb.RouteResponse = await self._stub(address).Route(
                pb.RouteRequest(model=model), metadata=self._md(marker), timeout=limit_s
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in RETRY_CODES or exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise PeerFailed(host, exc.code(), exc.details() or "") from None
            raise _domain(host, exc) from None
        return reply

    async def release(
        self, host: str, address: str, request: pb.ReleaseRequest, limit_s: float
    ) -> bool:
        try:
            reply = await self._stub(address).Release(
                request, metadata=self._md("1"), timeout=limit_s
            )
        except grpc.aio.AioRpcError as exc:
            raise _domain(host, exc) from None
        return bool(reply.released)

    async def renew(
        self, host: str, address: str, request: pb.RenewLeaseRequest, limit_s: float
    ) -> pb.RenewLeaseResponse:
        try:
            reply: pb.RenewLeaseResponse = await self._stub(address).RenewLease(
                request, metadata=self._md("1"), timeout=limit_s
            )
        except grpc.aio.AioRpcError as exc:
            raise _domain(host, exc) from None
        return reply

    async def load(
        self, host: str, address: str, request: pb.LoadRequest, limit_s: float, marker: str = "1"
    ) -> pb.LoadResponse:
        """`marker`: a claim's (coldstart.py), so that the target publishes under it."""
        try:
            reply: pb.LoadResponse = await self._stub(address).Load(
                request, metadata=self._md(marker), timeout=limit_s
            )
        except grpc.aio.AioRpcError as exc:
            raise _domain(host, exc) from None
        return reply

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()


def _domain(host: str, exc: grpc.aio.AioRpcError) -> errors.ModeldError:
    kind = ERRORS.get(exc.code(), errors.Unavailable)
    return kind(f"host {host}: {exc.details() or exc.code().name}")


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
