"""Prometheus metrics: one registry of the daemon's counters, and an HTTP listener for it.

Counters and histograms are bumped where a thing happens, through the methods of
`Metrics`. Gauges of current state (replicas by state, in-flight by model) are
not kept here: they are read at scrape time from functions the owner of that
state passes in, so they can never drift from it.

The listener is a minimal HTTP/1.1 server on asyncio streams: `GET /metrics`,
one request per connection, no threads.
"""

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from modeld.errors import ConfigError
from modeld.netaddr import split_host_port
from modeld.state import LIVE, ReplicaState

log = structlog.get_logger(__name__)

# (model, state) → number of replicas; states may be ReplicaState or its value.
ReplicaCounts = Callable[[], Mapping[tuple[str, str], int]]
InFlightCounts = Callable[[], Mapping[str, int]]

ROUTE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                 30, 60, 120, 300)  # fmt: skip
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TXN_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
               0.5, 1, 5)  # fmt: skip


class _StateCollector(Collector):
    """Reads the current replica and in-flight counts at scrape time."""

    def __init__(self) -> None:
        self.replicas: ReplicaCounts | None = None
        self.in_flight: InFlightCounts | None = None
        self.queued: InFlightCounts | None = None

    def describe(self) -> Iterable[Metric]:
        return self._families({}, {}, {})

    def collect(self) -> Iterable[Metric]:
        replicas = self.replicas() if self.replicas is not None else {}
        in_flight = self.in_flight() if self.in_flight is not None else {}
        queued = self.queued() if self.queued is not None else {}
        return self._families(replicas, in_flight, queued)

    @staticmethod
    def _families(
        replicas: Mapping[tuple[str, str], int],
        in_flight: Mapping[str, int],
        queued: Mapping[str, int],
    ) -> list[Metric]:
        by_state = GaugeMetricFamily(
            "modeld_replicas", "Replicas by model and state.", labels=["model", "state"]
        )
        for model in sorted({model for model, _ in replicas}):
            for state in ReplicaState:
                by_state.add_metric([model, state.value], replicas.get((model, state), 0))
        busy = GaugeMetricFamily("modeld_in_flight", "Active leases by model.", labels=["model"])
        for model, count in sorted(in_flight.items()):
            busy.add_metric([model], count)
        waiting = GaugeMetricFamily(
            "modeld_queue_length", "Routes waiting for a slot, by model.", labels=["model"]
        )
        for model, count in sorted(queued.items()):
            waiting.add_metric([model], count)
        return [by_state, busy, waiting]


@dataclass(frozen=True)
class ClusterStats:
    """The cluster's figures at one scrape (read from the cluster router)."""

    counters: Mapping[str, int]  # ClusterCounters' fields by name
    view_age: float  # seconds since the last full resync of the view
    host_replicas: Mapping[str, Mapping[str, int]]  # host_id → state → replicas
    hosts: Mapping[str, int]  # host state (alive, suspect, expired) → hosts


ClusterSource = Callable[[], ClusterStats]

# ClusterCounters field → (metric name, help). Counters other streams increment.
CLUSTER_COUNTERS = {
    "forwards": ("modeld_cluster_forwards", "Routes forwarded to a replica on another host."),
    "forward_retries": (
        "modeld_cluster_forward_retries",
        "Forwards that failed and were tried on another replica.",
    ),
    "claims_taken": ("modeld_cluster_claims_taken", "Cold-load claims this host took."),
    "claims_taken_over": (
        "modeld_cluster_claims_taken_over",
        "Expired claims of another host this host took over.",
    ),
    "claims_lost": ("modeld_cluster_claims_lost", "Claims this host held and lost (fenced)."),
    "placement_refusals": (
        "modeld_cluster_placement_refusals",
        "Placements refused (no eligible host, or the target's admission said no).",
    ),
}


class _ClusterCollector(Collector):
    """Reads the cluster router's figures at scrape time; nothing in single-host mode."""

    def __init__(self) -> None:
        self.source: ClusterSource | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        if self.source is None:
            return []
        stats = self.source()
        families: list[Metric] = []
        # A counter another stream adds to ClusterCounters is exported too, by its name.
        for field in [*CLUSTER_COUNTERS, *sorted(stats.counters.keys() - CLUSTER_COUNTERS.keys())]:
            name, doc = CLUSTER_COUNTERS.get(field, (f"modeld_cluster_{field}", field))
            family = CounterMetricFamily(name, doc)
            family.add_metric([], stats.counters.get(field, 0))
            families.append(family)
        age = GaugeMetricFamily(
            "modeld_cluster_view_staleness_seconds",
            "Seconds since the cluster view was last read in full from the database.",
        )
        age.add_metric([], stats.view_age)
        per_host = GaugeMetricFamily(
            "modeld_cluster_host_replicas",
            "Replicas by host and state, as this modeld's view shows them.",
            labels=["host", "state"],
        )
        for host, states in sorted(stats.host_replicas.items()):
            for state in ReplicaState:
                if state in LIVE:
                    per_host.add_metric([host, state.value], states.get(state.value, 0))
        hosts = GaugeMetricFamily(
            "modeld_cluster_hosts", "Hosts of the cluster by state.", labels=["state"]
        )
        for state_name, count in sorted(stats.hosts.items()):
            hosts.add_metric([state_name], count)
        return [*families, age, per_host, hosts]


class Metrics:
    """Every metric the daemon exports, on a registry of its own (never the global one)."""

    def __init__(self, *, process: bool = True) -> None:
        self.registry = reg = CollectorRegistry(auto_describe=True)

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, labels, registry=reg)

        def histogram(name: str, doc: str, buckets: Sequence[float], *labels: str) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=reg)

        self.routes = counter(
            "modeld_routes", "Route calls by model and result.", "model", "result"
        )
        self.route_latency = histogram(
            "modeld_route_latency_seconds", "Route call latency.", ROUTE_BUCKETS
        )
        self.queue_waits = histogram(
            "modeld_queue_wait_seconds",
            "How long Routes waited in a model's queue for a slot (parallel).",
            ROUTE_BUCKETS,
            "model",
        )
        self.cold_starts = counter("modeld_cold_starts", "Routes that started a replica.", "model")
        self.load_duration = histogram(
            "modeld_load_duration_seconds", "Spawn to READY, by backend.", LOAD_BUCKETS, "backend"
        )
        self.load_failures = counter(
            "modeld_load_failures", "Failed starts by backend and phase.", "backend", "phase"
        )
        self.evictions = counter("modeld_evictions", "Replicas evicted, by reason.", "reason")
        self.leases_expired = counter("modeld_leases_expired", "Leases that ran out unreleased.")
        self.backend_crashes = counter("modeld_backend_crashes", "Unexpected exits.", "model")
        self.backend_restarts = counter(
            "modeld_backend_restarts", "Replicas started again after a crash.", "model"
        )
        self.log_lines_dropped = counter(
            "modeld_log_lines_dropped", "Backend log lines a slow follower lost."
        )
        self.registry_transaction = histogram(
            "modeld_registry_transaction_seconds", "SQLite write transaction time.", TXN_BUCKETS
        )
        self._state = _StateCollector()
        reg.register(self._state)
        self._cluster = _ClusterCollector()
        reg.register(self._cluster)
        if process:
            ProcessCollector(registry=reg)

    def set_sources(
        self,
        *,
        replicas: ReplicaCounts,
        in_flight: InFlightCounts,
        queued: InFlightCounts | None = None,
    ) -> None:
        """Where the replica, in-flight and queue gauges are read from at each scrape."""
        self._state.replicas = replicas
        self._state.in_flight = in_flight
        self._state.queued = queued

    def set_cluster_source(self, source: ClusterSource) -> None:
        """Cluster mode: where the modeld_cluster_* metrics are read from at each scrape."""
        self._cluster.source = source

    def route(self, model: str, result: str, seconds: float) -> None:
        self.routes.labels(model, result).inc()
        self.route_latency.observe(seconds)

    def queue_wait(self, model: str, seconds: float) -> None:
        self.queue_waits.labels(model).observe(seconds)

    def cold_start(self, model: str) -> None:
        self.cold_starts.labels(model).inc()

    def load_finished(self, backend: str, seconds: float) -> None:
        self.load_duration.labels(backend).observe(seconds)

    def load_failed(self, backend: str, phase: str) -> None:
        self.load_failures.labels(backend, phase).inc()

    def evicted(self, reason: str) -> None:
        self.evictions.labels(reason).inc()

    def lease_expired(self, count: int = 1) -> None:
        self.leases_expired.inc(count)

    def backend_crashed(self, model: str) -> None:
        self.backend_crashes.labels(model).inc()

    def backend_restarted(self, model: str) -> None:
        self.backend_restarts.labels(model).inc()

    def log_dropped(self, lines: int) -> None:
        self.log_lines_dropped.inc(lines)

    def transaction(self, seconds: float) -> None:
        self.registry_transaction.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


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
            return 200, self._metrics.exposition(), CONTENT_TYPE_LATEST
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
