"""The gateway's leases: Route (with the affinity key), Release off the answer's path, renewals.

One owner for the leases this gateway holds: `route` grants them, `release_soon`
ends them. The client is an `AsyncClient(stream=True)`: Route, Release and renewals
go over RouteStreams to modeld, a message each, not a unary call each (on the
2-core development machine a Route is ~0.4 ms over a stream, ~0.7 ms as a call).
A stream writes one message at a time, each awaited, so under load the calls queue
for it: the gateway keeps a few (`serve.ROUTE_STREAMS`, a client each) and takes
them in turn (at 16 clients, four gave ~20% more requests/s than one).
A Release is sent in a task of its own once the answer is written, so a client
never waits for it, and `close` waits for those still on their way. A lease held
longer than a third of its time to live is renewed by a timer (no task per
request). A Route whose client went away while it waited is still seen through:
a lease granted after that is released at once, never left to expire.
"""

import asyncio
import itertools
import time
from collections.abc import Sequence

import grpc
import structlog

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.client import AsyncClient, rules
from modeld.client.lease import Lease

log = structlog.get_logger(__name__)

OK = pb.OK
UNREACHABLE = pb.BACKEND_UNREACHABLE
FAILED = pb.BACKEND_ERROR


def affinity_key(session_id: str | None, user: object) -> str:
    """The key that keeps one conversation on one replica: `X-Session-Id`, else the body's
    `user`; "" when there is neither."""
    if session_id:
        return session_id
    return user if isinstance(user, str) else ""


def fail_fast(error: grpc.RpcError) -> None:
    """The client's hook before it would wait for modeld and Route again: a gateway
    answers 503 with Retry-After at once instead, and its client tries again itself."""
    raise error


class Leases:
    def __init__(self, clients: Sequence[AsyncClient]) -> None:
        # Any stream may release or renew any lease: they all reach the same modeld.
        self._clients = itertools.cycle(clients)
        # Every lease held, with its next renewal's timer.
        self._held: dict[str, asyncio.TimerHandle] = {}
        self._pending: set[asyncio.Task[None]] = set()

    async def route(self, model: str, key: str) -> Lease:
        """A lease on a ready replica of `model` (raises the client's ModeldError)."""
        granting = asyncio.ensure_future(next(self._clients).route(model, affinity_key=key))
        try:
            lease = await asyncio.shield(granting)
        except asyncio.CancelledError:
            granting.add_done_callback(self._release_late)
            raise
        self._renew_later(lease)
        return lease

    def release_soon(self, lease: Lease, outcome: pb.ReleaseOutcome, note: str = "") -> None:
        """Release in the background: the answer has been written, nobody waits for this.
        A `note` is logged once modeld has the lease back (for what is rare: a client gone)."""
        self._stop_renewing(lease)
        task = asyncio.get_running_loop().create_task(self._release(lease, outcome, note))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def release_now(self, lease: Lease, outcome: pb.ReleaseOutcome) -> None:
        """Release and wait: before a retry, modeld must know this replica failed us."""
        self._stop_renewing(lease)
        await self._release(lease, outcome)

    async def close(self) -> None:
        for handle in self._held.values():
            handle.cancel()
        self._held.clear()
        await asyncio.gather(*self._pending, return_exceptions=True)

    async def _release(self, lease: Lease, outcome: pb.ReleaseOutcome, note: str = "") -> None:
        try:
            await next(self._clients).release(lease, outcome)
        except grpc.RpcError as exc:
            # The lease expires on its own at modeld; nothing the client could do about it.
            log.warning("gateway_release_failed", lease_id=lease.lease_id, error=str(exc))
            return
        if note:
            log.info(note, lease_id=lease.lease_id, replica_id=lease.replica_id)

    def _release_late(self, granting: "asyncio.Future[Lease]") -> None:
        if granting.cancelled() or granting.exception() is not None:
            return
        lease = granting.result()
        log.info("gateway_route_abandoned", lease_id=lease.lease_id, model_replica=lease.replica_id)
        self.release_soon(lease, OK)

    def _renew_later(self, lease: Lease) -> None:
        delay = rules.renew_interval(lease.expires_at, time.time())
        loop = asyncio.get_running_loop()
        self._held[lease.lease_id] = loop.call_later(delay, self._renew_now, lease)

    def _renew_now(self, lease: Lease) -> None:
        task = asyncio.get_running_loop().create_task(self._renew(lease))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _renew(self, lease: Lease) -> None:
        try:
            await next(self._clients).renew(lease, rules.time_left(lease.expires_at, time.time()))
        except grpc.RpcError as exc:
            if rules.renewal_over(exc, lease.expires_at, time.time()):
                log.warning("gateway_lease_lost", lease_id=lease.lease_id, error=str(exc))
                return
        else:
            # Once a third of a TTL per long answer: rare enough to say.
            log.info("gateway_lease_renewed", lease_id=lease.lease_id, renewals=lease.renewals)
        if lease.lease_id in self._held:
            self._renew_later(lease)

    def _stop_renewing(self, lease: Lease) -> None:
        handle = self._held.pop(lease.lease_id, None)
        if handle is not None:
            handle.cancel()
