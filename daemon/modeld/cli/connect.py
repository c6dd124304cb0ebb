"""How the client verbs reach the daemon: the connection flags and the call deadline.

What the flags mean (address discovery, TLS, token file) is `modeld.client.connect`,
shared with the Python client.
"""

import argparse
from dataclasses import dataclass
from typing import Any

import grpc

from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc
from modeld.client.connect import DEFAULT_SOCKET, DEFAULT_TCP, ConnectOptions, Metadata

__all__ = ["Session", "add_connection_flags", "connect"]


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


@dataclass(frozen=True)
class Session:
    """A stub plus what every call carries: the token metadata and the deadline."""

    stub: Any  # modeld_pb2_grpc.ModelControlStub (the generated stubs are untyped)
    channel: grpc.Channel
    addr: str
    metadata: Metadata
    timeout: float | None

    def close(self) -> None:
        self.channel.close()


def connect(args: argparse.Namespace) -> Session:
    resolved = ConnectOptions(
        addr=args.addr,
        token_file=args.token_file,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_server_name=args.tls_server_name,
    ).resolve()
    channel = resolved.channel()
    stub = pb_grpc.ModelControlStub(channel)  # type: ignore[no-untyped-call]
    return Session(
        stub=stub,
        channel=channel,
        addr=resolved.addr,
        metadata=resolved.metadata,
        timeout=args.timeout,
    )
