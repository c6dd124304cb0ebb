"""Prometheus metrics: scraped over real HTTP and read back with the client's parser."""

import asyncio
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from modeld.errors import ConfigError
from modeld.ops.metrics import Metrics, MetricsServer
from modeld.state import ReplicaState

WAIT = 5.0


async def fetch(url: str, method: str = "GET") -> tuple[int, str, str]:
    def call() -> tuple[int, str, str]:
        request = urllib.request.Request(url, method=method)
        try:
            with urllib.request.urlopen(request, timeout=WAIT) as reply:
                return reply.status, reply.headers["Content-Type"], reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()

    return await asyncio.to_thread(call)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert isinstance(s, Sample)
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


@pytest.fixture
async def served() -> AsyncIterator[tuple[Metrics, str]]:
    metrics = Metrics()
    server = MetricsServer(metrics, "127.0.0.1:0")
    await server.start()
    yield metrics, f"http://127.0.0.1:{server.port}"
    await asyncio.wait_for(server.close(), WAIT)


async def test_scrape_reports_what_was_counted(served: tuple[Metrics, str]) -> None:
    metrics, base = served
    replicas: Mapping[tuple[str, str], int] = {
        ("echo", ReplicaState.READY): 2,
        ("echo", ReplicaState.LOADING): 1,
    }
    metrics.set_sources(replicas=lambda: replicas, in_flight=lambda: {"echo": 3})
    metrics.route("echo", "ok", 0.002)
    metrics.route("echo", "ok", 0.004)
    metrics.route("echo", "unavailable", 1.5)
    metrics.cold_start("echo")
    metrics.load_finished("echo", 2.0)
    metrics.load_failed("echo", "ready")
    metrics.evicted("idle")
    metrics.lease_expired(2)
    metrics.backend_crashed("echo")
    metrics.backend_restarted("echo")
    metrics.log_dropped(7)
    metrics.transaction(0.003)

    status, ctype, body = await fetch(base + "/metrics")

    assert status == 200
    assert ctype.startswith("text/plain")
    got = samples(body)
    assert got[key("modeld_routes_total", model="echo", result="ok")] == 2
    assert got[key("modeld_routes_total", model="echo", result="unavailable")] == 1
    assert got[key("modeld_route_latency_seconds_count")] == 3
    assert got[key("modeld_route_latency_seconds_bucket", le="0.005")] == 2
    assert got[key("modeld_cold_starts_total", model="echo")] == 1
    assert got[key("modeld_load_duration_seconds_count", backend="echo")] == 1
    assert got[key("modeld_load_failures_total", backend="echo", phase="ready")] == 1
    assert got[key("modeld_evictions_total", reason="idle")] == 1
    assert got[key("modeld_leases_expired_total")] == 2
    assert got[key("modeld_backend_crashes_total", model="echo")] == 1
    assert got[key("modeld_backend_restarts_total", model="echo")] == 1
    assert got[key("modeld_log_lines_dropped_total")] == 7
    assert got[key("modeld_registry_transaction_seconds_count")] == 1
    assert got[key("modeld_replicas", model="echo", state="READY")] == 2
    assert got[key("modeld_replicas", model="echo", state="LOADING")] == 1
    assert got[key("modeld_replicas", model="echo", state="FAILED")] == 0
    assert got[key("modeld_in_flight", model="echo")] == 3


async def test_gauges_follow_the_source_between_scrapes(served: tuple[Metrics, str]) -> None:
    metrics, base = served
    in_flight = {"echo": 1}
    metrics.set_sources(replicas=dict, in_flight=lambda: in_flight)
    first = samples((await fetch(base + "/metrics"))[2])
    in_flight["echo"] = 0
    second = samples((await fetch(base + "/metrics"))[2])
    assert first[key("modeld_in_flight", model="echo")] == 1
    assert second[key("modeld_in_flight", model="echo")] == 0


async def test_other_paths_and_methods_are_refused(served: tuple[Metrics, str]) -> None:
    _, base = served
    assert (await fetch(base + "/"))[0] == 404
    assert (await fetch(base + "/metrics", method="POST"))[0] == 405
    head = await fetch(base + "/metrics?x=1", method="HEAD")
    assert head[0] == 200
    assert head[2] == ""


async def test_a_failing_source_is_a_500_and_the_server_lives_on(
    served: tuple[Metrics, str],
) -> None:
    metrics, base = served
    broken = True

    def replicas() -> Mapping[tuple[str, str], int]:
        if broken:
            raise RuntimeError("boom")
        return {}

    metrics.set_sources(replicas=replicas, in_flight=dict)
    assert (await fetch(base + "/metrics"))[0] == 500
    broken = False
    assert (await fetch(base + "/metrics"))[0] == 200


async def test_registries_are_private_to_each_instance() -> None:
    first, second = Metrics(), Metrics()
    first.cold_start("a")
    assert first.registry.get_sample_value("modeld_cold_starts_total", {"model": "a"}) == 1
    assert second.registry.get_sample_value("modeld_cold_starts_total", {"model": "a"}) is None


async def test_close_does_not_wait_for_an_idle_connection() -> None:
    server = MetricsServer(Metrics(process=False), "127.0.0.1:0")
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /metr")
    await writer.drain()
    await asyncio.wait_for(server.close(), WAIT)
    try:
        leftover = await asyncio.wait_for(reader.read(), WAIT)
    except ConnectionResetError:
        leftover = b""
    writer.close()
    assert leftover == b""


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:99999", "::1:9100"])
async def test_bad_listen_address_is_a_config_error(listen: str) -> None:
    with pytest.raises(ConfigError, match="metrics_listen"):
        await MetricsServer(Metrics(process=False), listen).start()


async def test_port_in_use_is_a_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="cannot bind"):
            await MetricsServer(Metrics(process=False), f"127.0.0.1:{port}").start()
