"""How the client verbs reach the daemon: address, TLS, bearer token, call deadline.

The address comes from `--addr`, else `MODELD_ADDR`, else the default socket when
it exists, else the default TCP port. The token comes from `--token-file`, else
`MODELD_TOKEN_FILE`; it is read here and sent as call metadata, never printed.
"""

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc
from modeld.errors import ConfigError

DEFAULT_SOCKET = Path("/run/modeld/modeld.sock")
DEFAULT_TCP = "127.0.0.1:50051"
Metadata = tuple[tuple[str, str], ...]


def default_addr(environ: Mapping[str, str] | None = None, socket: Path = DEFAULT_SOCKET) -> str:
    env = os.environ if environ is None else environ
    if addr := env.get("MODELD_ADDR"):
        return addr
    return f"unix://{socket}" if socket.exists() else DEFAULT_TCP


def add_connection_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument(
        "--addr",
        default=None,
        help="daemon address, host:port or unix:///path.sock (default: $MODELD_ADDR, "
        f"else unix://{DEFAULT_SOCKET} if it exists, else {DEFAULT_TCP})",
    )
    g.add_argument(
        "--token-file",
        default=None,
        help="send the first token in FILE as 'authorization: Bearer <token>' "
        "(default: $MODELD_TOKEN_FILE)",
    )
    g.add_argument("--tls-ca", help="talk TLS, trusting this PEM CA bundle")
    g.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS; needs --tls-ca")
    g.add_argument("--tls-key", help="client private key (PEM) for mutual TLS")
    g.add_argument("--tls-server-name", help="expect this name in the server's certificate")
    g.add_argument("--timeout", type=float, default=None, help="seconds to wait for the daemon")


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


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if args.tls_ca is None:
        if args.tls_cert or args.tls_key or args.tls_server_name:
            raise ConfigError("--tls-cert, --tls-key and --tls-server-name need --tls-ca")
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read("--tls-ca", args.tls_ca),
        private_key=_read("--tls-key", args.tls_key),
        certificate_chain=_read("--tls-cert", args.tls_cert),
    )


@dataclass(frozen=True)
class Session:
    """A stub plus what every call carries: the token metadata and the deadline."""

    stub: Any  # modeld_pb2_grpc.ModelControlStub (the generated stubs are untyped)
    channel: grpc.Channel
    metadata: Metadata
    timeout: float | None

    def close(self) -> None:
        self.channel.close()


def connect(args: argparse.Namespace) -> Session:
    addr = args.addr or default_addr()
    token_file = args.token_file or os.environ.get("MODELD_TOKEN_FILE")
    metadata: Metadata = ()
    if token_file:
        metadata = (("authorization", f"Bearer {read_token(token_file)}"),)
    creds = _credentials(args)
    if creds is None:
        channel = grpc.insecure_channel(addr)
    else:
        options = []
        if args.tls_server_name:
            options.append(("grpc.ssl_target_name_override", args.tls_server_name))
        channel = grpc.secure_channel(addr, creds, options=options)
    stub = pb_grpc.ModelControlStub(channel)  # type: ignore[no-untyped-call]
    return Session(stub=stub, channel=channel, metadata=metadata, timeout=args.timeout)
