"""How a client reaches the daemon: address, TLS and bearer token (the CLI's flags too).

The address is the one given, else `MODELD_ADDR`, else the default socket when it
exists, else the default TCP port. The token file is the one given, else
`MODELD_TOKEN_FILE`; its first token is sent as call metadata, never printed.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from modeld.errors import ConfigError

DEFAULT_SOCKET = Path("/run/modeld/modeld.sock")
DEFAULT_TCP = "127.0.0.1:50051"
Metadata = tuple[tuple[str, str], ...]
ChannelOptions = list[tuple[str, str]]


def default_addr(environ: Mapping[str, str] | None = None, socket: Path = DEFAULT_SOCKET) -> str:
    env = os.environ if environ is None else environ
    if addr := env.get("MODELD_ADDR"):
        return addr
    return f"unix://{socket}" if socket.exists() else DEFAULT_TCP


def read_token(path: str) -> str:
    """The first token of a token file: blank lines and `#` comments skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"token file {path}: {exc.strerror}") from None
    for line in text.splitlines():
        if (token := line.strip()) and not token.startswith("#"):
            return token
    raise ConfigError(f"token file {path}: no token in it")


def _read(flag: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class ConnectOptions:
    """Where the daemon is and how to prove who we are; files are read by `resolve()`."""

    addr: str | None = None
    token_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None

    def resolve(self, environ: Mapping[str, str] | None = None) -> "Resolved":
        env = os.environ if environ is None else environ
        token_file = self.token_file or env.get("MODELD_TOKEN_FILE")
        metadata: Metadata = ()
        if token_file:
            metadata = (("authorization", f"Bearer {read_token(token_file)}"),)
        options: ChannelOptions = []
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return Resolved(self.addr or default_addr(env), self._credentials(), metadata, options)

    def _credentials(self) -> grpc.ChannelCredentials | None:
        if self.tls_ca is None:
            if self.tls_cert or self.tls_key or self.tls_server_name:
                raise ConfigError("--tls-cert, --tls-key and --tls-server-name need --tls-ca")
            return None
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        return grpc.ssl_channel_credentials(
            root_certificates=_read("--tls-ca", self.tls_ca),
            private_key=_read("--tls-key", self.tls_key),
            certificate_chain=_read("--tls-cert", self.tls_cert),
        )


@dataclass(frozen=True)
class Resolved:
    addr: str
    credentials: grpc.ChannelCredentials | None
    metadata: Metadata
    options: ChannelOptions

    def channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.addr)
        return grpc.secure_channel(self.addr, self.credentials, options=self.options)

    def aio_channel(self) -> grpc.aio.Channel:
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.addr)
        return grpc.aio.secure_channel(self.addr, self.credentials, options=self.options)
