"""Backend-reported load (policy/load.py) and the picker's use of it, as pure functions."""

from dataclasses import replace

import pytest

from modeld.ops.metrics import Metrics
from modeld.policy.affinity import AffinityInput, build_ring, successors
from modeld.policy.load import BadMetrics, LoadInput, ReportedLoad, read_load
from modeld.policy.picker import pick_replica
from test_policy_picker import FREE, rv

VLLM = """# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="a"} 3.0
vllm:num_requests_waiting{model_name="b"} 4.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="a"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="a"} 0.5
# TYPE vllm:request_success counter
vllm:request_success_total{finished_reason="stop"} 10.0
"""
SGLANG = 'sglang:num_queue_reqs{name="m"} 7\nsglang:num_running_reqs{name="m"} 1\n'
LLAMACPP = (
    "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 2\n"
    "# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 9\n"
)


def test_each_kind_reads_its_own_gauges_summed_over_labels() -> None:
    assert read_load("vllm", VLLM) == ReportedLoad(waiting=7, running=2, kv_cache=0.5)
    assert read_load("sglang", SGLANG) == ReportedLoad(waiting=7, running=1)
    assert read_load("llamacpp", LLAMACPP) == ReportedLoad(waiting=9, running=2)


@pytest.mark.parametrize(
    "text",
    [
        "this {is} not = prometheus\n",
        "",
        "vllm:num_requests_waiting 1\n",  # no running gauge
        "vllm:num_requests_waiting NaN\nvllm:num_requests_running 0\n",
        "vllm:num_requests_waiting -3\nvllm:num_requests_running 0\n",
        "vllm:num_requests_waiting 1\nvllm:num_requests_running {\n",
    ],
)
def test_garbage_or_missing_gauges_are_bad_metrics(text: str) -> None:
    with pytest.raises(BadMetrics):
        read_load("vllm", text)


def test_a_replica_waiting_above_the_bound_is_skipped_while_another_is_not() -> None:
    busy, calm = rv("a"), rv("b", in_flight=3)
    load = LoadInput({"a": ReportedLoad(50, 4), "b": ReportedLoad(0, 3)}, saturation_waiting=5)
    assert pick_replica([busy, calm], FREE, load=load) == calm
    at_bound = LoadInput({"a": ReportedLoad(5, 0), "b": ReportedLoad(0, 9)}, 5)
    assert pick_replica([busy, calm], FREE, load=at_bound) == busy


def test_when_every_replica_is_saturated_the_least_loaded_still_serves() -> None:
    a, b = rv("a"), rv("b")
    load = LoadInput({"a": ReportedLoad(50, 4), "b": ReportedLoad(9, 4)}, 5)
    assert pick_replica([a, b], FREE, load=load) == b


def test_fewer_waiting_plus_running_first_never_below_own_leases() -> None:
    a, b = rv("a", last_used=1.0), rv("b", last_used=2.0)
    load = LoadInput({"a": ReportedLoad(1, 3), "b": ReportedLoad(0, 2)}, 5)
    assert pick_replica([a, b], FREE, load=load) == b
    # Leases granted since the last scrape count: b's 5 leases outweigh a's report of 4.
    assert pick_replica([a, replace(b, in_flight=5)], FREE, load=load) == a
    # A replica with no report is ranked on its leases.
    assert pick_replica([a, rv("c", in_flight=3)], FREE, load=load) == rv("c", in_flight=3)


def test_without_reports_the_pick_is_unchanged() -> None:
    replicas = [rv("a", in_flight=2), rv("b", last_used=50.0), rv("c", gpu_ids=(1,))]
    empty = LoadInput({}, 5)
    assert pick_replica(replicas, FREE, load=empty) == pick_replica(replicas, FREE)


def test_a_saturated_affinity_home_hands_the_key_on() -> None:
    ids = ("a", "b", "c")
    ring = build_ring(ids)
    home, second, _ = successors(ring, "k")
    replicas = [rv(i) for i in ids]
    affinity = AffinityInput(ring, "k")
    assert pick_replica(replicas, FREE, affinity=affinity) == rv(home)
    load = LoadInput({home: ReportedLoad(50, 1)}, 5)
    assert pick_replica(replicas, FREE, load=load, affinity=affinity) == rv(second)


def test_metrics_export_the_reported_figures_and_scrape_failures() -> None:
    metrics = Metrics(process=False)
    metrics.set_backend_load_source(lambda: {("m", "r1"): (50, 4, 0.25), ("m", "r2"): (0, 1, None)})
    metrics.load_scrape_failed("served")
    text = metrics.exposition().decode()
    assert 'modeld_backend_requests_waiting{model="m",replica="r1"} 50.0' in text
    assert 'modeld_backend_requests_running{model="m",replica="r2"} 1.0' in text
    assert 'modeld_backend_kv_cache_usage{model="m",replica="r1"} 0.25' in text
    assert 'modeld_backend_kv_cache_usage{model="m",replica="r2"}' not in text
    assert 'modeld_load_scrape_failures_total{backend="served"} 1.0' in text
