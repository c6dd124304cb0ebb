"""The asyncio client: `async with client.lease("model") as lease: ...` (a task renews it).

The asyncio twin of `Client`: same arguments, same rules (`client.rules`), awaitable
calls. Create it inside the event loop that uses it.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.client import rules
from modeld.client.base import ClientBase, Renewal, owner_answers
from modeld.client.errors import typed
from modeld.client.lease import Lease


class AsyncClient(ClientBase):
    __doc__ = ClientBase.__doc__
    _aio = True

    async def close(self) -> None:
        if self._route_stream is not None:
            await self._route_stream.close()
        for channel in self._owner_channels():
            await channel.close(None)
        await self._channel.close(None)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def route(self, model: str, *, affinity_key: str = "") -> Lease:
        """A lease on a replica of `model`; one `affinity_key` (a session id, a hash of
        a prompt's prefix) keeps going to one replica while it is not overloaded."""
        request = rules.route_request(model, affinity_key)
        deadline = self._deadline()
        try:
            return rules.lease_of(await self._call("Route", request, deadline))
        except grpc.RpcError as exc:
            pause = self._retry_pause(exc, deadline)
        # A pause, not a synchronisation (see rules.retry_pause).
        await asyncio.sleep(pause)
        return rules.lease_of(await self._call("Route", request, deadline, wait_for_ready=True))

    async def release(self, lease: Lease, outcome: pb.ReleaseOutcome | None = None) -> bool:
        request = rules.release_request(lease, outcome)
        reply = await self._at_owner(lease, "Release", request, self._deadline())
        return bool(reply.released)

    async def renew(self, lease: Lease, limit: float | None = None) -> float:
        request = rules.renew_request(lease)
        reply = await self._at_owner(lease, "RenewLease", request, self._deadline(limit))
        expires = rules.expiry_of(reply)
        lease._renewed(expires)
        return expires

    @contextlib.asynccontextmanager
    async def lease(
        self,
        model: str,
        *,
        renew: bool = True,
        unreachable_on: tuple[type, ...] = (),
        affinity_key: str = "",
    ) -> AsyncIterator[Lease]:
        """As `Client.lease`; a task renews the lease while the block runs."""
        lease = await self.route(model, affinity_key=affinity_key)
        block = rules.LeaseBlock(lease, unreachable_on)
        renewer = asyncio.create_task(self._renew_until_done(lease)) if renew else None
        try:
            with block:
                yield lease
        finally:
            if renewer is not None:
                renewer.cancel()
                await asyncio.gather(renewer, return_exceptions=True)
            with block.releasing():
                await self.release(lease, block.outcome)

    async def _renew_until_done(self, lease: Lease) -> None:
        renewal = Renewal(lease)
        while not renewal.over:
            await asyncio.sleep(renewal.pause())
            with renewal.trying():
                await self.renew(lease, renewal.limit())

    async def _call(
        self, method: str, request: Any, deadline: float, *, wait_for_ready: bool = False
    ) -> Any:
        if self._streamed(method):
            return await self._route_stream.call(method, request, self._timeout(deadline))
        with typed(self.addr):
            options = self._options(deadline, wait_for_ready)
            return await getattr(self.stub, method)(request, **options)

    async def _at_owner(self, lease: Lease, method: str, request: Any, deadline: float) -> Any:
        owner = self._owner_stub(lease)
        if owner is not None:
            with owner_answers(lease):
                return await getattr(owner, method)(request, **self._options(deadline, False))
        return await self._call(method, request, deadline)
