"""The asyncio client: `async with client.lease("model") as lease: ...` (a task renews it)."""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc
from modeld.client.connect import ConnectOptions
from modeld.client.lease import Lease, outcome_of, renewal_failed, status_code
from modeld.client.sync import DEFAULT_TIMEOUT, RetryHook


class AsyncClient:
    """The asyncio twin of `Client`: same arguments, same behaviour, awaitable calls.

    Create it inside the event loop that uses it.
    """

    def __init__(
        self,
        addr: str | None = None,
        *,
        token_file: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_server_name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry_delay: float = 1.0,
        on_retry: RetryHook | None = None,
    ) -> None:
        conn = ConnectOptions(addr, token_file, tls_ca, tls_cert, tls_key, tls_server_name)
        resolved = conn.resolve()
        self.addr = resolved.addr
        self._metadata = resolved.metadata
        self._channel = resolved.aio_channel()
        self.stub: Any = pb_grpc.ModelControlStub(self._channel)  # type: ignore[no-untyped-call]
        self.timeout = timeout
        self.retry_delay = retry_delay
        self.on_retry = on_retry

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def route(self, model: str) -> Lease:
        request = pb.RouteRequest(model=model)
        deadline = time.monotonic() + self.timeout
        try:
            return Lease.from_reply(await self._call("Route", request, deadline))
        except grpc.RpcError as exc:
            if status_code(exc) is not grpc.StatusCode.UNAVAILABLE:
                raise
            if self.on_retry is not None:
                self.on_retry(exc)
        # A pause, not a synchronisation (see Client.route).
        await asyncio.sleep(max(0.0, min(self.retry_delay, deadline - time.monotonic())))
        reply = await self._call("Route", request, deadline, wait_for_ready=True)
        return Lease.from_reply(reply)

    async def release(self, lease: Lease, outcome: pb.ReleaseOutcome | None = None) -> bool:
        request = pb.ReleaseRequest(
            lease_id=lease.lease_id,
            outcome=lease.outcome if outcome is None else outcome,
        )
        reply = await self._call("Release", request, time.monotonic() + self.timeout)
        return bool(reply.released)

    async def renew(self, lease: Lease, limit: float | None = None) -> float:
        request = pb.RenewLeaseRequest(lease_id=lease.lease_id)
        reply = await self._call(
            "RenewLease", request, time.monotonic() + (self.timeout if limit is None else limit)
        )
        expires = float(reply.lease_expires_at.ToNanoseconds() / 1e9)
        lease._renewed(expires)
        return expires

    @contextlib.asynccontextmanager
    async def lease(
        self, model: str, *, renew: bool = True, unreachable_on: tuple[type, ...] = ()
    ) -> AsyncIterator[Lease]:
        """As `Client.lease`; a task renews the lease while the block runs."""
        lease = await self.route(model)
        renewer = asyncio.create_task(self._renew_until_done(lease)) if renew else None
        error: BaseException | None = None
        try:
            yield lease
        except BaseException as exc:
            error = exc
            raise
        finally:
            if renewer is not None:
                renewer.cancel()
                await asyncio.gather(renewer, return_exceptions=True)
            await self._release_on_exit(lease, outcome_of(lease, error, unreachable_on), error)

    async def _renew_until_done(self, lease: Lease) -> None:
        while True:
            await asyncio.sleep(lease.renew_interval())
            try:
                await self.renew(lease, lease.time_left())
            except grpc.RpcError as exc:
                if renewal_failed(lease, exc):
                    return

    async def _release_on_exit(
        self, lease: Lease, outcome: pb.ReleaseOutcome, error: BaseException | None
    ) -> None:
        try:
            await self.release(lease, outcome)
        except grpc.RpcError as exc:
            if error is None:
                raise
            error.add_note(f"and releasing lease {lease.lease_id} failed too: {exc}")

    def _deadline(self, limit: float | None) -> float:
        return time.monotonic() + (self.timeout if limit is None else limit)

    async def _call(
        self, method: str, request: Any, deadline: float, *, wait_for_ready: bool = False
    ) -> Any:
        return await getattr(self.stub, method)(
            request,
            timeout=max(0.0, deadline - time.monotonic()),
            metadata=self._metadata,
            wait_for_ready=wait_for_ready,
        )
