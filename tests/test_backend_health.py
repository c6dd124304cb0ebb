"""What a start makes of an HTTP server's health answers and of its output, against the
real daemon and the http test backend (tests/backends/http_backend.py).

One daemon serves the whole module; each model is a server that misbehaves one way:
a health path it does not have (404), loading quietly (503 and nothing printed), an
access line for every probe, loader output on stderr before a flood on stdout.
"""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from daemon_proc import DaemonProc, running_daemon
from modeld._proto.modeld.v1 import modeld_pb2 as pb

pytestmark = pytest.mark.asyncio(loop_scope="module")

BACKEND = Path(__file__).parent / "backends" / "http_backend.py"
RING_LINES = 400


def server(name: str, *flags: str, **keys: str) -> str:
    extra = "".join(f', "{f}"' for f in flags)
    settings = "".join(f'{k} = "{v}"\n' for k, v in keys.items())
    return f"""
[backends.{name}]
command = ["{{python}}", "{BACKEND}", "--host", "{{host}}", "--port", "{{port}}",
           "--model", "{{model_file}}", "--ready-file", "{{model_file}}"{extra}]
protocol = "http"
health_path = "/health"
stop_grace = "2s"
start_attempts = 1
{settings}[models.{name}]
backend = "{name}"
model_file = "tiny.gguf"
"""


def catalog() -> str:
    return (
        f"[logs]\nring_lines = {RING_LINES}\n"
        + server("wrong_path", "--health-path", "/v1/models", ready_ceiling="10s")
        + server(
            "quiet_loader",
            "--quiet",
            "--ready-after",
            "3",
            ready_timeout="1s",
        )
        + server(
            "probe_logger",
            "--ready-file",
            "/nonexistent/ready",
            "--not-ready-status",
            "500",
            ready_timeout="1s",
            ready_ceiling="15s",
        )
        + server(
            "stderr_then_stdout",
            "--head",
            "5",
            "--chatty-stdout",
            "300",
            "--quiet",
            "--ready-file",
            "/nonexistent/ready",
            "--not-ready-status",
            "500",
            ready_timeout="1s",
            ready_ceiling="15s",
        )
        + server("long_loader", "--head", "600", "--chatty-stdout", "1000")
        + """
[backends.stdout_only]
command = ["{python}", "-c", "print('stdout says why'); raise SystemExit(3)"]
[models.stdout_only]
backend = "stdout_only"
"""
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def daemon(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DaemonProc]:
    tmp_path = tmp_path_factory.mktemp("health")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.gguf").write_bytes(b"GGUF")
    async with running_daemon(tmp_path, catalog()) as d:
        yield d


async def log_texts(d: DaemonProc, tail: int, **target: str) -> list[str]:
    request = pb.StreamLogsRequest(tail=tail, **target)
    return [line.text async for line in d.stub.StreamLogs(request, timeout=30)]


async def failed_route(d: DaemonProc, model: str) -> grpc.aio.AioRpcError:
    try:
        await d.stub.Route(pb.RouteRequest(model=model), timeout=60)
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError(f"a Route to {model} was granted")


async def test_a_health_path_answering_404_fails_the_start_at_once(daemon: DaemonProc) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    exc = await failed_route(daemon, "wrong_path")
    waited = loop.time() - began
    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.details()
    details = exc.details() or ""
    assert "404" in details
    assert "/health" in details and "http://127.0.0.1:" in details
    assert "backends.wrong_path.health_path" in details
    # Not waited out until the ceiling (10 s): the first probe's answer was enough.
    assert waited < 10.0


async def test_a_503_while_loading_is_progress_even_when_nothing_is_printed(
    daemon: DaemonProc,
) -> None:
    # The server loads for 3 s on its own clock, printing nothing, with ready_timeout 1 s.
    lease = await daemon.stub.Route(pb.RouteRequest(model="quiet_loader"), timeout=60)
    assert lease.cold_start
    await daemon.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id))


async def test_access_lines_of_probes_are_not_progress(daemon: DaemonProc) -> None:
    exc = await failed_route(daemon, "probe_logger")
    details = exc.details() or ""
    assert exc.code() == grpc.StatusCode.UNAVAILABLE
    assert "no progress for ready_timeout" in details, details
    texts = await log_texts(daemon, RING_LINES, model="probe_logger")
    probes = [text for text in texts if text == "GET /health 500"]
    # Backing off to 250 ms between probes, a wait of ~1 s probes a handful of times,
    # not every 20 ms as when each access line cut the pause short.
    assert 1 <= len(probes) < 25, len(probes)
