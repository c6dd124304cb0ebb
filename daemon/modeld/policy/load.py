"""What a backend says about its own load, and how the picker weighs it (pure).

An `http` backend with `load_metrics` set exposes Prometheus text (vLLM, SGLang,
llama.cpp's server); `read_load` turns one scrape into a `ReportedLoad` using
prometheus_client's text parser. The picker skips a replica whose waiting queue is
above `saturation_waiting` while another one is not, and ranks the rest by
`score`: waiting + running as reported, but never below the leases this daemon
holds on it, since a report is up to `load_interval` old and leases granted since
then are requests on their way (without that floor one report would send a whole
burst to the replica that happened to be idle at the last scrape).
No I/O, no clock, no logging.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from modeld.policy.view import ReplicaView


@dataclass(frozen=True, slots=True)
class MetricNames:
    waiting: str
    running: str
    kv_cache: str = ""


NAMES: Mapping[str, MetricNames] = {
    "vllm": MetricNames(
        "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"
    ),
    "sglang": MetricNames("sglang:num_queue_reqs", "sglang:num_running_reqs"),
    "llamacpp": MetricNames("llamacpp:requests_deferred", "llamacpp:requests_processing"),
}


@dataclass(frozen=True, slots=True)
class ReportedLoad:
    waiting: int
    running: int
    # Fraction 0..1 of the KV cache in use, where the backend says (vLLM); else None.
    kv_cache: float | None = None


class BadMetrics(ValueError):
    """The text is not Prometheus exposition, or lacks the gauges the kind names."""


def read_load(kind: str, text: str) -> ReportedLoad:
    """The load in one scrape; sums over label sets (one per served model name)."""
    # Imported at the first scrape: a daemon whose backends report no load never
    # loads prometheus_client (~20 ms of start-up, ~2 MiB).
    from prometheus_client.parser import text_string_to_metric_families

    names = NAMES[kind]
    wanted = {names.waiting, names.running, names.kv_cache} - {""}
    found: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted:
                    found[sample.name] = found.get(sample.name, 0.0) + sample.value
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise BadMetrics(f"not Prometheus text: {exc}") from exc
    missing = sorted({names.waiting, names.running} - set(found))
    if missing:
        raise BadMetrics(f"no {', '.join(missing)} in the metrics")
    kv = found.get(names.kv_cache) if names.kv_cache else None
    return ReportedLoad(_count(found[names.waiting]), _count(found[names.running]), kv)


def _count(value: float) -> int:
    if not 0 <= value <= 1e9:  # NaN, negative or absurd
        raise BadMetrics(f"a queue length of {value} is not a count")
    return int(value)


@dataclass(frozen=True, slots=True)
class LoadInput:
    """The picker's input: the latest report per replica id, and the backend's bound."""

    reported: Mapping[str, ReportedLoad]
    saturation_waiting: int

    def saturated(self, replica: ReplicaView) -> bool:
        load = self.reported.get(replica.id)
        return load is not None and load.waiting > self.saturation_waiting

    def unsaturated(self, replicas: Sequence[ReplicaView]) -> Sequence[ReplicaView]:
        """Those not saturated; all of them when every one is."""
        calm = [r for r in replicas if not self.saturated(r)]
        return calm or replicas

    def score(self, replica: ReplicaView) -> int:
        load = self.reported.get(replica.id)
        if load is None:
            return replica.in_flight
        return max(load.waiting + load.running, replica.in_flight)
