"""What `Client` and `AsyncClient` share besides the rules: the connection and the options."""

import time
from collections.abc import Callable
from typing import Any

import grpc

from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc
from modeld.client import rules
from modeld.client.connect import ConnectOptions

RetryHook = Callable[[grpc.RpcError], None]


class ClientBase:
    """A connection to modeld. Connection arguments are the CLI's (see `ConnectOptions`).

    `timeout` bounds each call (a Route may wait for a cold start); a Route that
    fails with UNAVAILABLE is tried once more after `retry_delay` seconds, waiting
    for the daemon to be reachable, and `on_retry` (if given) sees the first error.
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
    ) -> None:
        conn = ConnectOptions(addr, token_file, tls_ca, tls_cert, tls_key, tls_server_name)
        resolved = conn.resolve()
        self.addr = resolved.addr
        self._metadata = resolved.metadata
        self._channel: Any = resolved.aio_channel() if self._aio else resolved.channel()
        # The generated stub, for every other RPC; pass `metadata=client.metadata`.
        self.stub: Any = pb_grpc.ModelControlStub(self._channel)  # type: ignore[no-untyped-call]
        self.timeout = timeout
        self.retry_delay = retry_delay
        self.on_retry = on_retry

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

    def _options(self, deadline: float, wait_for_ready: bool) -> dict[str, Any]:
        return {
            "timeout": rules.call_timeout(deadline, time.monotonic()),
            "metadata": self._metadata,
            "wait_for_ready": wait_for_ready,
        }
