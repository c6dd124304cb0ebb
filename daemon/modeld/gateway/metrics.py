"""The gateway's own Prometheus metrics, served on its `/metrics` (Prometheus conventions).

- `modeld_gateway_requests_total{endpoint, status}`: answered requests by HTTP status;
- `modeld_gateway_errors_total{code}`: the gateway's own refusals by error code;
- `modeld_gateway_time_to_first_byte_seconds{endpoint}`: request in to first byte out;
- `modeld_gateway_upstream_retries_total`: requests sent again to another replica;
- `modeld_gateway_requests_in_flight`: requests being answered now.
"""

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# The endpoints named in labels; any other path counts as "other" (labels stay bounded).
ENDPOINTS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health"}
)
_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def endpoint(path: str) -> str:
    return path if path in ENDPOINTS else "other"


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "modeld_gateway_requests", "Requests answered, by endpoint and HTTP status.",
            ["endpoint", "status"], registry=self.registry,
        )  # fmt: skip
        self.errors = Counter(
            "modeld_gateway_errors", "Requests the gateway refused or failed, by error code.",
            ["code"], registry=self.registry,
        )  # fmt: skip
        self.first_byte = Histogram(
            "modeld_gateway_time_to_first_byte_seconds",
            "From a request's arrival to the first byte of its answer.",
            ["endpoint"], buckets=_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.retries = Counter(
            "modeld_gateway_upstream_retries",
            "Requests sent again to another replica after the first could not be reached.",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "modeld_gateway_requests_in_flight", "Requests being answered now.",
            registry=self.registry,
        )  # fmt: skip

        # Label children by their values: looking one up costs a lock and a tuple per call.
        self._answered: dict[tuple[str, int], Any] = {}
        self._first_byte: dict[str, Any] = {}

    def answered(self, endpoint: str, status: int) -> None:
        child = self._answered.get((endpoint, status))
        if child is None:
            child = self._answered[endpoint, status] = self.requests.labels(endpoint, str(status))
        child.inc()

    def first_byte_after(self, endpoint: str, seconds: float) -> None:
        child = self._first_byte.get(endpoint)
        if child is None:
            child = self._first_byte[endpoint] = self.first_byte.labels(endpoint)
        child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
