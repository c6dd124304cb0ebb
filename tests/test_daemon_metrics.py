"""The real daemon's Prometheus endpoint, scraped over HTTP after real routes."""

import asyncio
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from backend_proc import free_port
from daemon_proc import ECHO_CATALOG, running_daemon
from modeld._proto.modeld.v1 import modeld_pb2 as pb

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    def get() -> tuple[str, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return reply.headers["Content-Type"], reply.read().decode()

    ctype, text = await asyncio.to_thread(get)
    assert ctype.startswith("text/plain; version=")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_scrape_after_a_cold_route_and_release(tmp_path: Path) -> None:
    port = free_port()
    async with running_daemon(
        tmp_path, f'metrics_listen = "127.0.0.1:{port}"\n' + ECHO_CATALOG
    ) as d:
        lease = await d.stub.Route(pb.RouteRequest(model="echo"), timeout=30)
        assert lease.cold_start
        busy = await scrape(port)
        assert value(busy, "modeld_in_flight", model="echo") == 1
        await d.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id))
        warm = await d.stub.Route(pb.RouteRequest(model="echo"), timeout=30)
        await d.stub.Release(pb.ReleaseRequest(lease_id=warm.lease_id))
        s = await scrape(port)
    assert value(s, "modeld_routes_total", model="echo", result="ok") == 2
    assert value(s, "modeld_cold_starts_total", model="echo") == 1
    assert value(s, "modeld_route_latency_seconds_count") == 2
    count = value(s, "modeld_load_duration_seconds_count", backend="echo")
    assert count is not None and count >= 1
    load_sum = value(s, "modeld_load_duration_seconds_sum", backend="echo")
    assert load_sum is not None and 0 < load_sum < 30
    assert value(s, "modeld_replicas", model="echo", state="READY") == 1
    assert value(s, "modeld_replicas", model="echo", state="STARTING") == 0
    assert value(s, "modeld_in_flight", model="echo") == 0
    transactions = value(s, "modeld_registry_transaction_seconds_count")
    assert transactions is not None and transactions >= 1
    assert value(s, "modeld_leases_expired_total") == 0
    assert value(s, "process_resident_memory_bytes") is not None
