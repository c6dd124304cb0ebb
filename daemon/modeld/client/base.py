"""What `Client` and `AsyncClient` share besides the rules: the connection, the options,
and the rules read against this host's clocks."""

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc
from modeld.client import rules
from modeld.client.connect import ConnectOptions
from modeld.client.errors import from_rpc
from modeld.client.lease import Lease
from modeld.client.stream import CALLS as STREAM_CALLS
from modeld.client.stream import AsyncRouteStream, SyncRouteStream

RetryHook = Callable[[grpc.RpcError], None]


class ClientBase:
    """A connection to modeld. Connection arguments are the CLI's (see `ConnectOptions`).

    In a cluster, a lease's Release and RenewLease go straight to the modeld that
    owns it (`Lease.owner_address`), with the same TLS and token; an owner this client
    cannot reach is asked through the connected modeld instead.

    `timeout` bounds each call (a Route may wait for a cold start); a Route that
    found no modeld (UNAVAILABLE, unreachable or restarting) is tried once more after
    `retry_delay` seconds, waiting for the daemon to be reachable, and `on_retry` (if
    given) sees the first error. An UNAVAILABLE modeld answered (a start that failed)
    is final, unless modeld says a retry may win (see `rules.retry_pause`).

    `stream=True` sends Route, Release and RenewLease to the connected modeld over
    one RouteStream instead of one unary call each (same answers and errors, at a
    fraction of the cost per call; see `client.stream`).
    """

    _aio = False

    def __init__(
        self,
        addr: str | None = None,
        *,
        token_file: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_server_name: str | None = None,
        timeout: float = rules.DEFAULT_TIMEOUT,
        retry_delay: float = 1.0,
        on_retry: RetryHook | None = None,
        stream: bool = False,
    ) -> None:
        conn = ConnectOptions(addr, token_file, tls_ca, tls_cert, tls_key, tls_server_name)
        self._resolved = resolved = conn.resolve()
        self.addr = resolved.addr
        self._metadata = resolved.metadata
        self._channel: Any = resolved.aio_channel() if self._aio else resolved.channel()
        # The generated stub, for every other RPC; pass `metadata=client.metadata`.
        self.stub: Any = pb_grpc.ModelControlStub(self._channel)  # type: ignore[no-untyped-call]
        # Channels to lease owners (cluster mode), with the same TLS and token, by address.
        self._owners: dict[str, tuple[Any, Any]] = {}
        self.timeout = timeout
        self.retry_delay = retry_delay
        self.on_retry = on_retry
        kind = AsyncRouteStream if self._aio else SyncRouteStream
        self._route_stream: Any = kind(self.stub, self._metadata, self.addr) if stream else None

    def _owner_stub(self, lease: Lease) -> Any:
        """The stub for the lease's owner, when it is not the connected modeld."""
        target = rules.owner_target(lease, self.addr)
        if target is None:
            return None
        if target not in self._owners:
            resolved = dataclasses.replace(self._resolved, addr=target)
            channel = resolved.aio_channel() if self._aio else resolved.channel()
            self._owners[target] = (channel, pb_grpc.ModelControlStub(channel))  # type: ignore[no-untyped-call]
        return self._owners[target][1]

    def _owner_channels(self) -> list[Any]:
        channels = [channel for channel, _stub in self._owners.values()]
        self._owners.clear()
        return channels

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def _deadline(self, limit: float | None = None) -> float:
        return rules.deadline_for(time.monotonic(), self.timeout, limit)

    def _retry_pause(self, error: grpc.RpcError, deadline: float) -> float:
        """The pause before a Route's one retry; raises `error` when it is final."""
        pause = rules.retry_pause(error, self.retry_delay, deadline, time.monotonic())
        if pause is None:
            raise error
        if self.on_retry is not None:
            self.on_retry(error)
        return pause

    def _timeout(self, deadline: float) -> float:
        return rules.call_timeout(deadline, time.monotonic())

    def _streamed(self, method: str) -> bool:
        """Whether `method` goes over this client's RouteStream."""
        return self._route_stream is not None and method in STREAM_CALLS

    def _options(self, deadline: float, wait_for_ready: bool) -> dict[str, Any]:
        return {
            "timeout": self._timeout(deadline),
            "metadata": self._metadata,
            "wait_for_ready": wait_for_ready,
        }


@contextlib.contextmanager
def owner_answers(lease: Lease) -> Iterator[None]:
    """Around a call to a lease's owner: the owner's own answer is final (typed); a
    failure that `rules.try_connected` passes on is swallowed, so that the caller
    asks the connected modeld after the block."""
    try:
        yield
    except grpc.RpcError as exc:
        if not rules.try_connected(exc):
            raise from_rpc(exc, lease.owner_address) from exc


class Renewal:
    """One lease's renewals, by this host's wall clock: how long to wait before each,
    how long each may take, and when they are over; the renewers only wait."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.over = False

    def pause(self) -> float:
        return rules.renew_interval(self.lease.expires_at, time.time())

    def limit(self) -> float:
        return rules.time_left(self.lease.expires_at, time.time())

    @contextlib.contextmanager
    def trying(self) -> Iterator[None]:
        """Around one renewal: a failure is swallowed, and ends the renewals (the lease
        lost) where `rules.renewal_over` says so."""
        try:
            yield
        except grpc.RpcError as exc:
            if rules.renewal_over(exc, self.lease.expires_at, time.time()):
                self.lease._lose(exc)
                self.over = True
