"""The Prometheus side of `Metrics`: a registry that renders its tallies at scrape time.

Imported only when something reads the metrics (the `metrics_listen` endpoint, a
test): a daemon without it never loads prometheus_client. Tallies become counter
and histogram families at each collect; replica and in-flight gauges, and the
cluster's figures, are read from their owners' functions at that moment too.
"""

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from modeld.state import LIVE, ReplicaState

if TYPE_CHECKING:
    from modeld.ops.metrics import (
        BackendLoads,
        Buckets,
        ClusterSource,
        InFlightCounts,
        Metrics,
        ReplicaCounts,
        Tally,
    )

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
    # The link's own (cluster/link.py), counted without asking the database.
    "db_transactions": (
        "modeld_cluster_db_transactions",
        "Transactions this modeld ran on the cluster database (committed or rolled back).",
    ),
    "db_notifications": (
        "modeld_cluster_db_notifications",
        "Notifications this modeld heard from the cluster database.",
    ),
    "db_connects": (
        "modeld_cluster_db_connects",
        "Connections this modeld opened to the cluster database (1 + reconnects).",
    ),
}

__all__ = ["CONTENT_TYPE_LATEST", "build_registry", "render"]


def build_registry(metrics: "Metrics", *, process: bool) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_TallyCollector(metrics))
    registry.register(_StateCollector(metrics))
    registry.register(_ClusterCollector(metrics))
    registry.register(_BackendLoadCollector(metrics))
    if process:
        ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return _generate_latest(registry)


class _TallyCollector(Collector):
    """The daemon's counters and histograms, as `Metrics` tallied them."""

    def __init__(self, metrics: "Metrics") -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        families: list[Metric] = []
        for tally in self._metrics.tallies:
            families.append(_counter(tally))
        for buckets in self._metrics.histograms:
            families.append(_histogram(buckets))
        return families


def _counter(tally: "Tally") -> Metric:
    family = CounterMetricFamily(tally.name, tally.doc, labels=list(tally.labels))
    counts = tally.counts
    if not tally.labels and not counts:
        counts = {(): 0.0}
    for labels, value in sorted(counts.items()):
        family.add_metric(list(labels), value)
    return family


def _histogram(buckets: "Buckets") -> Metric:
    family = HistogramMetricFamily(buckets.name, buckets.doc, labels=list(buckets.labels))
    series = buckets.series
    if not buckets.labels and not series:
        series = {(): buckets.empty()}
    for labels, (counts, total) in sorted(series.items()):
        cumulative, rows = 0, []
        for bound, count in zip(buckets.bounds, counts, strict=False):
            cumulative += count
            rows.append((_bound(bound), cumulative))
        cumulative += counts[-1]
        rows.append(("+Inf", cumulative))
        family.add_metric(list(labels), rows, total)
    return family


def _bound(value: float) -> str:
    # prometheus_client's own spelling of a bucket bound (0.5 -> "0.5", 1 -> "1.0").
    return repr(float(value))


class _StateCollector(Collector):
    """Reads the current replica and in-flight counts at scrape time."""

    def __init__(self, metrics: "Metrics") -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return self._families({}, {}, {})

    def collect(self) -> Iterable[Metric]:
        replicas: ReplicaCounts | None = self._metrics.replica_counts
        in_flight: InFlightCounts | None = self._metrics.in_flight_counts
        queued: InFlightCounts | None = self._metrics.queued_counts
        return self._families(
            replicas() if replicas is not None else {},
            in_flight() if in_flight is not None else {},
            queued() if queued is not None else {},
        )

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


class _ClusterCollector(Collector):
    """Reads the cluster router's figures at scrape time; nothing in single-host mode."""

    def __init__(self, metrics: "Metrics") -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        source: ClusterSource | None = self._metrics.cluster_source
        if source is None:
            return []
        stats = source()
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
        connections = GaugeMetricFamily(
            "modeld_cluster_db_connections",
            "Connections to the cluster database this modeld holds now.",
        )
        connections.add_metric([], stats.db_connections)
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
        return [*families, age, connections, per_host, hosts]


class _BackendLoadCollector(Collector):
    """What `load_metrics` backends last reported, per replica, read at scrape time."""

    def __init__(self, metrics: "Metrics") -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return self._families({})

    def collect(self) -> Iterable[Metric]:
        source: BackendLoads | None = self._metrics.backend_loads
        return self._families(source() if source is not None else {})

    @staticmethod
    def _families(loads: Mapping[tuple[str, str], tuple[int, int, float | None]]) -> list[Metric]:
        labels = ["model", "replica"]
        waiting = GaugeMetricFamily(
            "modeld_backend_requests_waiting", "Requests a backend says wait.", labels=labels
        )
        running = GaugeMetricFamily(
            "modeld_backend_requests_running", "Requests a backend says it runs.", labels=labels
        )
        kv = GaugeMetricFamily(
            "modeld_backend_kv_cache_usage", "KV cache in use (0..1), vLLM.", labels=labels
        )
        for key, (w, r, cache) in sorted(loads.items()):
            waiting.add_metric(list(key), w)
            running.add_metric(list(key), r)
            if cache is not None:
                kv.add_metric(list(key), cache)
        return [waiting, running, kv]
