"""The blocking client: `with client.lease("model") as lease: ...` (a thread renews it).

The decisions are `client.rules`'; this module only waits, in threads.
"""

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.client import rules
from modeld.client.base import ClientBase, Renewal, owner_answers
from modeld.client.errors import typed
from modeld.client.lease import Lease


class Client(ClientBase):
    __doc__ = ClientBase.__doc__

    def close(self) -> None:
        if self._route_stream is not None:
            self._route_stream.close()
        for channel in self._owner_channels():
            channel.close()
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def route(self, model: str, *, affinity_key: str = "") -> Lease:
        """A lease on a replica of `model`; one `affinity_key` (a session id, a hash of
        a prompt's prefix) keeps going to one replica while it is not overloaded."""
        request = rules.route_request(model, affinity_key)
        deadline = self._deadline()
        try:
            return rules.lease_of(self._call("Route", request, deadline))
        except grpc.RpcError as exc:
            pause = self._retry_pause(exc, deadline)
        # A pause, not a synchronisation (see rules.retry_pause).
        time.sleep(pause)
        return rules.lease_of(self._call("Route", request, deadline, wait_for_ready=True))

    def release(self, lease: Lease, outcome: pb.ReleaseOutcome | None = None) -> bool:
        request = rules.release_request(lease, outcome)
        reply = self._at_owner(lease, "Release", request, self._deadline())
        return bool(reply.released)

    def renew(self, lease: Lease, limit: float | None = None) -> float:
        reply = self._at_owner(
            lease, "RenewLease", rules.renew_request(lease), self._deadline(limit)
        )
        expires = rules.expiry_of(reply)
        lease._renewed(expires)
        return expires

    @contextlib.contextmanager
    def lease(
        self,
        model: str,
        *,
        renew: bool = True,
        unreachable_on: tuple[type, ...] = (),
        affinity_key: str = "",
    ) -> Iterator[Lease]:
        """Route, yield the lease, release it on the way out with the block's outcome.

        Leaving by `raise lease.unreachable(exc)` releases with BACKEND_UNREACHABLE, and
        so does an exception of a type in `unreachable_on`, which leaves the block as a
        `BackendUnreachable` raised from it; `raise lease.failed(exc)` releases with
        BACKEND_ERROR, anything else with OK. A thread renews the lease while
        the block runs (`renew=False` turns that off).
        """
        lease = self.route(model, affinity_key=affinity_key)
        block = rules.LeaseBlock(lease, unreachable_on)
        renewer = _Renewer(self, lease) if renew else None
        try:
            with block:
                yield lease
        finally:
            if renewer is not None:
                renewer.stop()
            with block.releasing():
                self.release(lease, block.outcome)

    def _call(
        self, method: str, request: Any, deadline: float, *, wait_for_ready: bool = False
    ) -> Any:
        if self._streamed(method):
            return self._route_stream.call(method, request, self._timeout(deadline))
        with typed(self.addr):
            return getattr(self.stub, method)(request, **self._options(deadline, wait_for_ready))

    def _at_owner(self, lease: Lease, method: str, request: Any, deadline: float) -> Any:
        owner = self._owner_stub(lease)
        if owner is not None:
            with owner_answers(lease):
                return getattr(owner, method)(request, **self._options(deadline, False))
        return self._call(method, request, deadline)


class _Renewer:
    """Renews one lease from a thread until stopped or the renewals are over."""

    def __init__(self, client: Client, lease: Lease) -> None:
        self._client = client
        self._renewal = Renewal(lease)
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"modeld-renew-{lease.lease_id[:8]}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        renewal = self._renewal
        while not renewal.over and not self._stopped.wait(renewal.pause()):
            with renewal.trying():
                self._client.renew(renewal.lease, renewal.limit())

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
