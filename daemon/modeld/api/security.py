"""Who may talk to the daemon: TLS and mutual TLS, bearer tokens, and safe listen addresses.

Tokens are secrets: they are compared in constant time, and never logged nor put
into an error message or the config dump.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import structlog

from modeld.config.secrets import load_tokens, read_secret
from modeld.errors import ConfigError
from modeld.netaddr import is_loopback, is_unix, split_host_port

log = structlog.get_logger(__name__)

OPEN_HEALTH = "/grpc.health.v1.Health/"
# Both grpc.reflection.v1alpha and grpc.reflection.v1.
OPEN_REFLECTION = "/grpc.reflection."
DENIALS = {
    "missing": "this modeld requires a token: send metadata 'authorization: Bearer <token>'",
    "malformed": "the authorization metadata must read 'Bearer <token>'",
    "invalid": "the bearer token is not valid",
}


def server_credentials(
    tls_cert: str | Path | None, tls_key: str | Path | None, tls_client_ca: str | Path | None
) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port, or None when TLS is off (all three unset).

    With a client CA, clients must present a certificate it signed (mutual TLS).
    """
    if not tls_cert and not tls_key:
        if tls_client_ca:
            raise ConfigError("tls_client_ca is set but TLS is off: set tls_cert and tls_key too")
        return None
    if not tls_cert or not tls_key:
        raise ConfigError("tls_cert and tls_key must be set together")
    cert = read_secret("tls_cert", tls_cert)
    key = read_secret("tls_key", tls_key)
    ca = read_secret("tls_client_ca", tls_client_ca) if tls_client_ca else None
    for name, pem, marker in (
        ("tls_cert", cert, b"-----BEGIN CERTIFICATE-----"),
        ("tls_key", key, b"PRIVATE KEY-----"),
        ("tls_client_ca", ca, b"-----BEGIN CERTIFICATE-----"),
    ):
        if pem is not None and marker not in pem:
            raise ConfigError(f"{name}: not a PEM file (no {marker.decode()!r} in it)")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Interceptor = grpc.aio.ServerInterceptor
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable["Handler"]]


class TokenAuth(Interceptor):
    """Lets an RPC through only with `authorization: Bearer <one of the tokens>`."""

    def __init__(self, tokens: Sequence[bytes], open_prefixes: Iterable[str] = ()) -> None:
        if not tokens:
            raise ValueError("TokenAuth needs at least one token")
        self._tokens = tuple(tokens)
        self._open = tuple(open_prefixes)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        # None (not in the stubs' types) when no service has the method.
        handler: Handler | None = await continuation(handler_call_details)
        method = handler_call_details.method
        refusal = None
        if not method.startswith(self._open):
            refusal = self.refusal(handler_call_details.invocation_metadata)
        if refusal is None:
            return handler  # type: ignore[return-value]
        return _denial(handler, method, refusal)

    def refusal(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """Why these metadata are refused (a key of DENIALS), or None when they pass."""
        values = [value for key, value in metadata or () if key == "authorization"]
        if not values:
            return "missing"
        value = values[0]
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "malformed"
        given = token.strip().encode("latin-1", errors="replace")
        matched = False
        # Every token is compared, so the time taken says nothing about which one is close.
        for known in self._tokens:
            matched |= hmac.compare_digest(given, known)
        return None if matched else "invalid"


def _denial(handler: Handler | None, method: str, refusal: str) -> Handler:
    """A handler of the same streaming shape as `handler` that fails with UNAUTHENTICATED."""

    async def deny(request: object, context: grpc.aio.ServicerContext[object, object]) -> None:
        log.warning("auth_denied", method=method, peer=context.peer(), reason=refusal)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIALS[refusal])

    streams_in = handler is not None and handler.request_streaming
    streams_out = handler is not None and handler.response_streaming
    if streams_in and streams_out:
        return grpc.stream_stream_rpc_method_handler(deny)
    if streams_in:
        return grpc.stream_unary_rpc_method_handler(deny)
    if streams_out:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


def token_auth(
    auth_token_file: str | Path | None, *, open_health: bool, open_reflection: bool
) -> TokenAuth | None:
    """The interceptor for the config's token settings; None when no token file is set."""
    if not auth_token_file:
        return None
    open_prefixes = [OPEN_HEALTH] * open_health + [OPEN_REFLECTION] * open_reflection
    return TokenAuth(load_tokens(auth_token_file), open_prefixes)


def check_listen_security(
    listen: Iterable[str],
    *,
    tls_enabled: bool,
    token_enabled: bool,
    allow_insecure_remote: bool,
) -> None:
    """Refuse a TCP address other hosts can reach unless TLS or a token guards it."""
    if tls_enabled or token_enabled or allow_insecure_remote:
        return
    for address in listen:
        if is_unix(address):
            continue
        try:
            host, _ = split_host_port(address)
        except ValueError as exc:
            raise ConfigError(f"listen: {exc}") from None
        if not is_loopback(host):
            raise ConfigError(
                f"listen: {address} can be reached from other hosts, but neither TLS "
                "(tls_cert, tls_key) nor a token (auth_token_file) is set; set one, or set "
                "allow_insecure_remote = true to accept an open port"
            )
