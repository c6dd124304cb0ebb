"""One inference request: lease a replica, forward, relay the answer, release with the outcome.

Connection refused or reset before the replica answered: that lease is released as
BACKEND_UNREACHABLE (modeld then routes around the replica and probes it) and the
request goes once more, to the replica a new Route names; the client sees nothing of
it. Once bytes of the answer went out, a failure ends the stream: with an error event
for server-sent events, by closing the connection otherwise; never a hang. A client
that goes away cancels its handler, which closes the upstream request, so the
replica stops too; the lease is released all the same.
"""

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import structlog
from aiohttp import ClientResponse, web

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.client.errors import ModeldError
from modeld.client.lease import Lease
from modeld.gateway import errors
from modeld.gateway.leasing import FAILED, OK, UNREACHABLE, Leases
from modeld.gateway.metrics import Metrics
from modeld.gateway.upstream import UNREACHABLE_ERRORS, Headers, Upstream, answer_headers

log = structlog.get_logger(__name__)

TRIES = 2
# Answers up to this size with a known length are read whole and sent in one write;
# longer ones, and every stream, are relayed chunk by chunk as they arrive.
WHOLE_LIMIT = 1 << 20
EVENTS = "text/event-stream"
# Logged once the lease of an answer its client left is back at modeld.
CLIENT_GONE = "gateway_client_gone"


@dataclass(slots=True)
class Call:
    """What the gateway forwards: the request as it came, and what it routes by."""

    model: str
    affinity_key: str
    method: str
    path_qs: str
    body: bytes
    headers: Headers
    endpoint: str
    started: float  # time.perf_counter() at arrival


class Proxy:
    def __init__(
        self, leases: Leases, upstream: Upstream, metrics: Metrics, retry_after: float
    ) -> None:
        self._leases = leases
        self._upstream = upstream
        self._metrics = metrics
        self._retry_after = retry_after

    async def serve(self, request: web.Request, call: Call) -> web.StreamResponse:
        for attempt in range(1, TRIES + 1):
            lease = await self._lease(call)
            try:
                answer = await self._upstream.send(
                    lease.address, call.method, call.path_qs, call.body, call.headers
                )
            except UNREACHABLE_ERRORS as exc:
                log.warning(
                    "gateway_replica_unreachable", model=call.model, replica_id=lease.replica_id,
                    address=lease.address, attempt=attempt, error=str(exc),
                )  # fmt: skip
                await self._leases.release_now(lease, UNREACHABLE)
                if attempt < TRIES:
                    self._metrics.retries.inc()
                continue
            except aiohttp.ClientError as exc:
                # It answered, but not in HTTP this client can read.
                self._leases.release_soon(lease, FAILED)
                raise errors.broken_stream(call.model, _why(exc)) from None
            except BaseException:
                self._leases.release_soon(lease, OK)
                raise
            return await self._relay(request, call, lease, answer)
        raise errors.unreachable(call.model, TRIES)

    async def _lease(self, call: Call) -> Lease:
        try:
            lease = await self._leases.route(call.model, call.affinity_key)
        except ModeldError as exc:
            raise errors.from_modeld(exc, call.model, self._retry_after) from None
        if lease.protocol != "http":
            await self._leases.release_now(lease, OK)
            raise errors.wrong_protocol(call.model, lease.protocol)
        return lease

    async def _relay(
        self, request: web.Request, call: Call, lease: Lease, answer: ClientResponse
    ) -> web.StreamResponse:
        outcome = FAILED if answer.status >= 500 else OK
        gone = ""
        try:
            length = answer.content_length
            if length is not None and length <= WHOLE_LIMIT and answer.content_type != EVENTS:
                try:
                    body = await answer.read()
                except (aiohttp.ClientError, OSError) as exc:
                    outcome = _outcome_of(exc)
                    raise errors.broken_stream(call.model, _why(exc)) from None
                self._first_byte(call)
                headers = answer_headers(answer)
                return web.Response(
                    body=body, status=answer.status, reason=answer.reason, headers=headers
                )
            out = web.StreamResponse(
                status=answer.status, reason=answer.reason, headers=answer_headers(answer)
            )
            try:
                await out.prepare(request)
                self._first_byte(call)
                outcome = await self._stream(request, call, answer, out, outcome)
                await out.write_eof()
            except ConnectionResetError:
                gone = CLIENT_GONE
            return out
        except asyncio.CancelledError:
            # The client went away (aiohttp cancels its handler).
            gone = CLIENT_GONE
            raise
        finally:
            # A whole answer leaves the connection to the pool; any other is closed, which
            # tells the replica to stop (a client gone away, an answer broken off).
            if answer.content.is_eof():
                answer.release()
            else:
                answer.close()
            self._leases.release_soon(lease, outcome, gone)

    async def _stream(
        self,
        request: web.Request,
        call: Call,
        answer: ClientResponse,
        out: web.StreamResponse,
        outcome: pb.ReleaseOutcome,
    ) -> pb.ReleaseOutcome:
        """Relay the chunks as they come; returns the outcome for the lease."""
        while True:
            try:
                chunk = await answer.content.readany()
            except (aiohttp.ClientError, OSError) as exc:
                await self._broke_off(request, call, answer, out, exc)
                return _outcome_of(exc)
            if not chunk:
                return outcome
            await out.write(chunk)

    async def _broke_off(
        self,
        request: web.Request,
        call: Call,
        answer: ClientResponse,
        out: web.StreamResponse,
        exc: BaseException,
    ) -> None:
        log.warning("gateway_stream_broke_off", model=call.model, error=_why(exc))
        self._metrics.errors.labels(code="backend_error").inc()
        if answer.content_type == EVENTS:
            await out.write(errors.broken_stream(call.model, _why(exc)).event())
        elif request.transport is not None:
            # Nothing in a plain body can say "incomplete": the closed connection does.
            request.transport.close()

    def _first_byte(self, call: Call) -> None:
        self._metrics.first_byte_after(call.endpoint, time.perf_counter() - call.started)


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _outcome_of(exc: BaseException) -> pb.ReleaseOutcome:
    """A connection that broke, or an answer cut short, is most likely a replica that died
    (modeld probes it: a live one is left alone); anything else is the replica's error."""
    broke = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
    return UNREACHABLE if isinstance(exc, broke) else FAILED
