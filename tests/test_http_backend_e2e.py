"""`protocol = "http"` against the real daemon: a backend that answers its health path
503 while loading (as llama-server does) is not routed to until it answers 200."""

import asyncio
import urllib.request
from pathlib import Path

import grpc

from daemon_proc import running_daemon
from modeld._proto.modeld.v1 import modeld_pb2 as pb

BACKEND = Path(__file__).parent / "backends" / "http_backend.py"


def catalog(ready_file: Path) -> str:
    return f"""
[backends.server]
command = ["{{python}}", "{BACKEND}", "--host", "{{host}}", "--port", "{{port}}",
           "--model", "{{model_file}}", "--ready-file", "{ready_file}"]
protocol = "http"
health_path = "/health"
stop_grace = "2s"
[models.served]
backend = "server"
model_file = "tiny.gguf"
"""


def health_status(address: str) -> int:
    with urllib.request.urlopen(f"http://{address}/health", timeout=10) as reply:
        return int(reply.status)


async def wait_line(stream: grpc.aio.UnaryStreamCall, text: str) -> None:  # type: ignore[type-arg]
    async for line in stream:
        if line.text == text:
            return
    raise AssertionError(f"the log stream ended before {text!r}")


async def test_routes_wait_for_200_while_the_health_path_answers_503(tmp_path: Path) -> None:
    ready = tmp_path / "loaded"
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.gguf").write_bytes(b"GGUF")
    async with running_daemon(tmp_path, catalog(ready)) as d:
        route = asyncio.ensure_future(d.stub.Route(pb.RouteRequest(model="served"), timeout=60))
        logs = d.stub.StreamLogs(pb.StreamLogsRequest(model="served", follow=True))
        await asyncio.wait_for(wait_line(logs, "GET /health 503"), 30)
        listed = await d.stub.ListReplicas(pb.ListReplicasRequest(model="served"))
        assert [r.state for r in listed.replicas] == [pb.WAITING_READY]
        assert not route.done()
        ready.touch()
        lease = await route
        logs.cancel()
        assert lease.protocol == pb.HTTP
        assert lease.cold_start
        assert await asyncio.to_thread(health_status, lease.address) == 200
        listed = await d.stub.ListReplicas(pb.ListReplicasRequest(model="served"))
        assert [r.state for r in listed.replicas] == [pb.READY]


async def test_a_server_that_cannot_open_its_model_fails_the_route(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, catalog(tmp_path / "loaded")) as d:
        try:
            await d.stub.Route(pb.RouteRequest(model="served"), timeout=30)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            assert "cannot open model" in (exc.details() or "")
        else:
            raise AssertionError("a Route to a server that exited was granted")
