"""The daemon's metrics: counters and histograms tallied in plain dicts, exported to
Prometheus on demand, and an HTTP listener for them.

Counters and histograms are bumped where a thing happens, through the methods of
`Metrics`: an update is a dict step (a bisect for a histogram) on the event loop
that owns them, with no lock and no prometheus_client object per call. Gauges of
current state (replicas by state, in-flight by model) are not kept here: they are
read at scrape time from functions the owner of that state passes in, so they can
never drift from it. The Prometheus registry (`ops/exposition.py`) is built the
first time something reads the metrics, so a daemon without `metrics_listen`
never imports prometheus_client.

The listener is a minimal HTTP/1.1 server on asyncio streams: `GET /metrics`,
one request per connection, no threads.
"""

import asyncio
import bisect
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from modeld.errors import ConfigError
from modeld.netaddr import split_host_port

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = structlog.get_logger(__name__)

# (model, state) → number of replicas; states may be ReplicaState or its value.
ReplicaCounts = Callable[[], Mapping[tuple[str, str], int]]
InFlightCounts = Callable[[], Mapping[str, int]]

ROUTE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                 30, 60, 120, 300)  # fmt: skip
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TXN_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
               0.5, 1, 5)  # fmt: skip


class Tally:
    """A counter by label values (a Prometheus counter family `<name>_total`)."""

    __slots__ = ("counts", "doc", "labels", "name")

    def __init__(self, name: str, doc: str, *labels: str) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.counts: dict[tuple[str, ...], float] = {}

    def inc(self, *values: str, by: float = 1) -> None:
        self.counts[values] = self.counts.get(values, 0) + by


class Buckets:
    """A histogram by label values: per series, counts per bucket (the last one
    above every bound) and the sum of what was observed."""

    __slots__ = ("bounds", "doc", "labels", "name", "series")

    def __init__(self, name: str, doc: str, bounds: Sequence[float], *labels: str) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.bounds = tuple(bounds)
        self.series: dict[tuple[str, ...], tuple[list[int], float]] = {}

    def empty(self) -> tuple[list[int], float]:
        return [0] * (len(self.bounds) + 1), 0.0

    def observe(self, value: float, *values: str) -> None:
        counts, total = self.series.get(values) or self.empty()
        # A value equal to a bound belongs to that bucket (le: less than or equal).
        counts[bisect.bisect_left(self.bounds, value)] += 1
        self.series[values] = (counts, total + value)


# (model, replica id) → (waiting, running, KV cache fraction or None), as the backend said.
BackendLoads = Callable[[], Mapping[tuple[str, str], tuple[int, int, float | None]]]


@dataclass(frozen=True)
class ClusterStats:
    """The cluster's figures at one scrape (read from the cluster router)."""

    counters: Mapping[str, int]  # ClusterCounters' fields by name
    view_age: float  # seconds since the last full resync of the view
    host_replicas: Mapping[str, Mapping[str, int]]  # host_id → state → replicas
    hosts: Mapping[str, int]  # host state (alive, suspect, expired) → hosts
    db_connections: int = 0  # connections to the cluster database open now


ClusterSource = Callable[[], ClusterStats]


class Metrics:
    """Every metric the daemon exports; its Prometheus registry is its own (never the
    global one) and built on first use."""

    def __init__(self, *, process: bool = True) -> None:
        self._process = process
        self._registry: CollectorRegistry | None = None
        self.routes = Tally("modeld_routes", "Route calls by model and result.", "model", "result")
        self.route_latency = Buckets(
            "modeld_route_latency_seconds", "Route call latency.", ROUTE_BUCKETS
        )
        self.queue_waits = Buckets(
            "modeld_queue_wait_seconds",
            "How long Routes waited in a model's queue for a slot (parallel).",
            ROUTE_BUCKETS,
            "model",
        )
        self.cold_starts = Tally("modeld_cold_starts", "Routes that started a replica.", "model")
        self.load_duration = Buckets(
            "modeld_load_duration_seconds", "Spawn to READY, by backend.", LOAD_BUCKETS, "backend"
        )
        self.load_failures = Tally(
            "modeld_load_failures", "Failed starts by backend and phase.", "backend", "phase"
        )
        self.evictions = Tally("modeld_evictions", "Replicas evicted, by reason.", "reason")
        self.leases_expired = Tally("modeld_leases_expired", "Leases that ran out unreleased.")
        self.backend_crashes = Tally("modeld_backend_crashes", "Unexpected exits.", "model")
        self.backend_restarts = Tally(
            "modeld_backend_restarts", "Replicas started again after a crash.", "model"
        )
        self.health_judgments = Tally(
            "modeld_replica_health",
            "Health judgments of READY replicas: SUSPECT (a probe failed or a client "
            "reported it unreachable), HEALTHY (cleared), DEAD (proven, then stopped).",
            "judgment",
        )
        self.load_scrape_failures = Tally(
            "modeld_load_scrape_failures",
            "Scrapes of a backend's load metrics that failed, by backend.",
            "backend",
        )
        self.log_lines_dropped = Tally(
            "modeld_log_lines_dropped", "Backend log lines a slow follower lost."
        )
        self.registry_transaction = Buckets(
            "modeld_registry_transaction_seconds", "SQLite write transaction time.", TXN_BUCKETS
        )
        self.tallies = (
            self.routes,
            self.cold_starts,
            self.load_failures,
            self.evictions,
            self.leases_expired,
            self.backend_crashes,
            self.backend_restarts,
            self.health_judgments,
            self.load_scrape_failures,
            self.log_lines_dropped,
        )
        self.histograms = (
            self.route_latency,
            self.queue_waits,
            self.load_duration,
            self.registry_transaction,
        )
        self.replica_counts: ReplicaCounts | None = None
        self.in_flight_counts: InFlightCounts | None = None
        self.queued_counts: InFlightCounts | None = None
        self.cluster_source: ClusterSource | None = None
        self.backend_loads: BackendLoads | None = None

    @property
    def registry(self) -> "CollectorRegistry":
        """The Prometheus registry that reads these metrics (prometheus_client is
        imported here, the first time)."""
        if self._registry is None:
            from modeld.ops.exposition import build_registry

            self._registry = build_registry(self, process=self._process)
        return self._registry

    def set_sources(
        self,
        *,
        replicas: ReplicaCounts,
        in_flight: InFlightCounts,
        queued: InFlightCounts | None = None,
    ) -> None:
        """Where the replica, in-flight and queue gauges are read from at each scrape."""
        self.replica_counts = replicas
        self.in_flight_counts = in_flight
        self.queued_counts = queued

    def set_cluster_source(self, source: ClusterSource) -> None:
        """Cluster mode: where the modeld_cluster_* metrics are read from at each scrape."""
        self.cluster_source = source

    def set_backend_load_source(self, source: BackendLoads) -> None:
        """Where the modeld_backend_* gauges (what load_metrics backends report) are read."""
        self.backend_loads = source

    def load_scrape_failed(self, backend: str) -> None:
        self.load_scrape_failures.inc(backend)

    def route(self, model: str, result: str, seconds: float) -> None:
        self.routes.inc(model, result)
        self.route_latency.observe(seconds)

    def queue_wait(self, model: str, seconds: float) -> None:
        self.queue_waits.observe(seconds, model)

    def cold_start(self, model: str) -> None:
        self.cold_starts.inc(model)

    def load_finished(self, backend: str, seconds: float) -> None:
        self.load_duration.observe(seconds, backend)

    def load_failed(self, backend: str, phase: str) -> None:
        self.load_failures.inc(backend, phase)

    def evicted(self, reason: str) -> None:
        self.evictions.inc(reason)

    def lease_expired(self, count: int = 1) -> None:
        self.leases_expired.inc(by=count)

    def backend_crashed(self, model: str) -> None:
        self.backend_crashes.inc(model)

    def backend_restarted(self, model: str) -> None:
        self.backend_restarts.inc(model)

    def health_judged(self, judgment: str) -> None:
        self.health_judgments.inc(judgment)

    def log_dropped(self, lines: int) -> None:
        self.log_lines_dropped.inc(by=lines)

    def transaction(self, seconds: float) -> None:
        self.registry_transaction.observe(seconds)

    def exposition(self) -> bytes:
        from modeld.ops.exposition import render

        return render(self.registry)


READ_TIMEOUT = 5.0
MAX_REQUEST_HEAD = 16 * 1024
REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}


class MetricsServer:
    """Serves `GET /metrics` on `host:port` (port 0 picks a free one; see `port`)."""

    def __init__(self, metrics: Metrics, listen: str) -> None:
        self._metrics = metrics
        self._listen = listen
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        try:
            host, port = split_host_port(self._listen)
        except ValueError as exc:
            raise ConfigError(f"metrics_listen: {exc}") from None
        try:
            self._server = await asyncio.start_server(
                self._handle, host or None, port, limit=MAX_REQUEST_HEAD
            )
        except OSError as exc:
            raise ConfigError(f"metrics_listen: cannot bind {self._listen}: {exc}") from None
        log.info("metrics_listening", listen=self._listen, port=self.port)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in tuple(self._handlers):
            task.cancel()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            method, _, rest = head.decode("latin-1").partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            status, body, ctype = self._respond(method, path)
            await self._write(writer, status, b"" if method == "HEAD" else body, ctype, len(body))
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    def _respond(self, method: str, path: str) -> tuple[int, bytes, str]:
        if method not in ("GET", "HEAD"):
            return 405, b"only GET and HEAD\n", "text/plain; charset=utf-8"
        if path != "/metrics":
            return 404, b"metrics are at /metrics\n", "text/plain; charset=utf-8"
        try:
            return 200, self._metrics.exposition(), _content_type()
        except Exception:
            log.exception("metrics_collect_failed")
            return 500, b"collecting metrics failed; see the modeld log\n", "text/plain"

    @staticmethod
    async def _write(
        writer: asyncio.StreamWriter, status: int, body: bytes, ctype: str, length: int
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n"
        )
        if status == 405:
            head += "Allow: GET, HEAD\r\n"
        writer.write(head.encode() + b"\r\n" + body)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT)


def _content_type() -> str:
    from modeld.ops.exposition import CONTENT_TYPE_LATEST

    return CONTENT_TYPE_LATEST
