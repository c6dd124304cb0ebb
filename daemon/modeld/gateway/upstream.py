"""The HTTP client to replicas: one aiohttp session, a keep-alive pool per replica address.

A request's bytes go out as they came in (no JSON re-encoding) and the answer's
come back as they arrive, compressed or not (no decompression on the way). What
hop-by-hop headers say is about one connection, so they are not passed on.
"""

import aiohttp
from aiohttp import ClientResponse
from multidict import CIMultiDictProxy
from yarl import URL

# RFC 9110 §7.6.1 and the ones aiohttp sets itself for each hop.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
        "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
    )
)  # fmt: skip

# Errors that mean the replica never got to answer (refused, reset, closed, or not
# accepting within connect_timeout): nothing reached the client yet, so another
# replica may be asked instead.
UNREACHABLE_ERRORS = (
    aiohttp.ClientOSError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ConnectionTimeoutError,
)


Headers = list[tuple[str, str]]


def skipped(drop: frozenset[str]) -> frozenset[str]:
    """What `forwarded` leaves out: hop-by-hop headers and `drop` (lower case)."""
    return HOP_BY_HOP | {h.lower() for h in drop}


def forwarded(headers: CIMultiDictProxy[str], skip: frozenset[str]) -> Headers:
    """The request headers for the replica: all but `skip` (see `skipped`). Pairs, not a
    multidict: aiohttp copies them into its own either way."""
    return [(k, v) for k, v in headers.items() if k.lower() not in skip]


def answer_headers(response: ClientResponse) -> Headers:
    return [(k, v) for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP]


class Upstream:
    def __init__(self, connect_timeout: float, per_replica: int) -> None:
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=per_replica, keepalive_timeout=30.0, ttl_dns_cache=None
        )
        # No total timeout: a long answer is fine as long as it keeps coming.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def send(
        self, address: str, method: str, path_qs: str, body: bytes, headers: Headers
    ) -> ClientResponse:
        """The replica's answer, its head read (raises UNREACHABLE_ERRORS when it cannot be)."""
        url = URL(f"http://{address}{path_qs}", encoded=True)
        return await self._session.request(
            method, url, data=body, headers=headers, allow_redirects=False
        )

    async def close(self) -> None:
        await self._session.close()
