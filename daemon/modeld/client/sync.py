"""The blocking client: `with client.lease("model") as lease: ...` (a thread renews it)."""

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc
from modeld.client.connect import ConnectOptions
from modeld.client.lease import Lease, outcome_of, renewal_failed, status_code

DEFAULT_TIMEOUT = 300.0
RetryHook = Callable[[grpc.RpcError], None]


class Client:
    """A connection to modeld. Connection arguments are the CLI's (see `ConnectOptions`).

    `timeout` bounds each call (a Route may wait for a cold start); a Route that
    fails with UNAVAILABLE is tried once more after `retry_delay` seconds, waiting
    for the daemon to be reachable, and `on_retry` (if given) sees the first error.
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
        self._channel = resolved.channel()
        # The generated stub, for every other RPC; pass `metadata=client.metadata`.
        self.stub: Any = pb_grpc.ModelControlStub(self._channel)  # type: ignore[no-untyped-call]
        self.timeout = timeout
        self.retry_delay = retry_delay
        self.on_retry = on_retry

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def route(self, model: str) -> Lease:
        request = pb.RouteRequest(model=model)
        deadline = time.monotonic() + self.timeout
        try:
            return Lease.from_reply(self._call("Route", request, deadline))
        except grpc.RpcError as exc:
            if status_code(exc) is not grpc.StatusCode.UNAVAILABLE:
                raise
            if self.on_retry is not None:
                self.on_retry(exc)
        # A pause, not a synchronisation: a just-crashed replica or a restarting
        # daemon needs a moment before the same request can succeed.
        time.sleep(max(0.0, min(self.retry_delay, deadline - time.monotonic())))
        return Lease.from_reply(self._call("Route", request, deadline, wait_for_ready=True))

    def release(self, lease: Lease, outcome: pb.ReleaseOutcome | None = None) -> bool:
        request = pb.ReleaseRequest(
            lease_id=lease.lease_id,
            outcome=lease.outcome if outcome is None else outcome,
        )
        reply = self._call("Release", request, time.monotonic() + self.timeout)
        return bool(reply.released)

    def renew(self, lease: Lease, limit: float | None = None) -> float:
        request = pb.RenewLeaseRequest(lease_id=lease.lease_id)
        reply = self._call(
            "RenewLease", request, time.monotonic() + (self.timeout if limit is None else limit)
        )
        expires = float(reply.lease_expires_at.ToNanoseconds() / 1e9)
        lease._renewed(expires)
        return expires

    @contextlib.contextmanager
    def lease(
        self, model: str, *, renew: bool = True, unreachable_on: tuple[type, ...] = ()
    ) -> Iterator[Lease]:
        """Route, yield the lease, release it on the way out with the block's outcome.

        Leaving by `raise lease.unreachable(exc)` (or an exception of a type in
        `unreachable_on`) releases with BACKEND_UNREACHABLE, `raise lease.failed(exc)`
        with BACKEND_ERROR, anything else with OK. A thread renews the lease while
        the block runs (`renew=False` turns that off).
        """
        lease = self.route(model)
        renewer = _Renewer(self, lease) if renew else None
        error: BaseException | None = None
        try:
            yield lease
        except BaseException as exc:
            error = exc
            raise
        finally:
            if renewer is not None:
                renewer.stop()
            self._release_on_exit(lease, outcome_of(lease, error, unreachable_on), error)

    def _release_on_exit(
        self, lease: Lease, outcome: pb.ReleaseOutcome, error: BaseException | None
    ) -> None:
        try:
            self.release(lease, outcome)
        except grpc.RpcError as exc:
            if error is None:
                raise
            error.add_note(f"and releasing lease {lease.lease_id} failed too: {exc}")

    def _deadline(self, limit: float | None) -> float:
        return time.monotonic() + (self.timeout if limit is None else limit)

    def _call(
        self, method: str, request: Any, deadline: float, *, wait_for_ready: bool = False
    ) -> Any:
        return getattr(self.stub, method)(
            request,
            timeout=max(0.0, deadline - time.monotonic()),
            metadata=self._metadata,
            wait_for_ready=wait_for_ready,
        )


class _Renewer:
    """Renews one lease from a thread until stopped or the lease is gone."""

    def __init__(self, client: Client, lease: Lease) -> None:
        self._client = client
        self._lease = lease
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"modeld-renew-{lease.lease_id[:8]}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._lease.renew_interval()):
            try:
                self._client.renew(self._lease, self._lease.time_left())
            except grpc.RpcError as exc:
                if renewal_failed(self._lease, exc):
                    return

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
