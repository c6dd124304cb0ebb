"""A Python client for modeld: leases in one line, sync or asyncio.

    from modeld.client import Client

    with Client() as client, client.lease("echo") as lease:
        talk_to_backend(lease.address)   # released on exit; renewed while it runs

Connection arguments are the CLI's: `addr` (else MODELD_ADDR, else the default
socket if it exists, else 127.0.0.1:50051), `token_file` (else MODELD_TOKEN_FILE),
`tls_ca`, `tls_cert`, `tls_key`, `tls_server_name`. `AsyncClient` is the asyncio twin.

A refused or failed call raises a `ModeldError` of the status's kind (`NotFound`,
`InvalidArgument`, `FailedPrecondition`, `ResourceExhausted`, `Unavailable`,
`DeadlineExceeded`, `PermissionDenied`), with `.status` and `.message`.
"""

from modeld.client.aio import AsyncClient
from modeld.client.connect import ConnectOptions
from modeld.client.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ModeldError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from modeld.client.lease import BackendFailed, BackendUnreachable, Lease
from modeld.client.sync import Client

__all__ = [
    "AsyncClient",
    "BackendFailed",
    "BackendUnreachable",
    "Client",
    "ConnectOptions",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "Lease",
    "ModeldError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unavailable",
]
