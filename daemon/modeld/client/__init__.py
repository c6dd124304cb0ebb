"""A Python client for modeld: leases in one line, sync or asyncio.

    from modeld.client import Client

    with Client() as client, client.lease("echo") as lease:
        talk_to_backend(lease.address)   # released on exit; renewed while it runs

Connection arguments are the CLI's: `addr` (else MODELD_ADDR, else the default
socket if it exists, else 127.0.0.1:50051), `token_file` (else MODELD_TOKEN_FILE),
`tls_ca`, `tls_cert`, `tls_key`, `tls_server_name`. `AsyncClient` is the asyncio twin.
"""

from modeld.client.aio import AsyncClient
from modeld.client.connect import ConnectOptions
from modeld.client.lease import BackendFailed, BackendUnreachable, Lease
from modeld.client.sync import Client

__all__ = [
    "AsyncClient",
    "BackendFailed",
    "BackendUnreachable",
    "Client",
    "ConnectOptions",
    "Lease",
]
