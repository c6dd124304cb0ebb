"""The real daemon as a subprocess: health, reflection, durability, shutdown, bad input."""

import asyncio
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from daemon_proc import ECHO_CATALOG, running_daemon, start_daemon, wait_pids_gone, write_config
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.storage.catalog import MAX_API_MODELS


async def test_serves_health_and_reflection(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ECHO_CATALOG) as d:
        health = health_pb2_grpc.HealthStub(d.channel)  # type: ignore[no-untyped-call]
        for service in ("", "modeld.v1.ModelControl"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(d.channel)  # type: ignore[no-untyped-call]
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        names = set()
        async for reply in stub.ServerReflectionInfo(iter([request])):
            names |= {s.name for s in reply.list_services_response.service}
        assert {"modeld.v1.ModelControl", "grpc.health.v1.Health"} <= names
        backends = await d.stub.ListBackends(pb.ListBackendsRequest())
        assert [b.name for b in backends.backends] == ["echo"]


async def test_put_model_survives_restart(tmp_path: Path) -> None:
    config, addr = write_config(tmp_path, ECHO_CATALOG)
    d = await start_daemon(config, addr)
    spec = pb.ModelSpec(
        name="mine", backend="echo", options={"context_size": "512"}, max_replicas=2
    )
    spec.idle_ttl.FromSeconds(90)
    put = await d.stub.PutModel(pb.PutModelRequest(spec=spec))
    assert put.source == "api"
    assert await d.stop() == 0
    d = await start_daemon(config, addr)
    try:
        listed = {m.name: m for m in (await d.stub.ListModels(pb.ListModelsRequest())).models}
        assert listed["mine"].options["context_size"] == "512"
        assert listed["mine"].idle_ttl.seconds == 90
        assert listed["echo"].source == "config"
    finally:
        assert await d.stop() == 0
    db = sqlite3.connect(tmp_path / "state" / "modeld.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()


async def test_sigterm_with_a_ready_replica_exits_0_and_stops_it(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ECHO_CATALOG) as d:
        loaded = await d.stub.Load(pb.LoadRequest(model="echo"), timeout=30)
        pid = loaded.replicas[0].pid
        started = time.monotonic()
        code = await d.stop(signal.SIGTERM)
        elapsed = time.monotonic() - started
        assert code == 0
        assert elapsed < 5 + 2 + 3, f"shutdown took {elapsed:.1f}s"
        assert await wait_pids_gone([pid], 1) == []


BAD_REQUESTS: list[tuple[Any, grpc.StatusCode, str]] = [
    (lambda s: s.Route(pb.RouteRequest(model="nope")), grpc.StatusCode.NOT_FOUND, "'nope'"),
    (lambda s: s.Route(pb.RouteRequest(model="")), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    (
        lambda s: s.Route(pb.RouteRequest(model="x" * 500)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "limit",
    ),
    (
        lambda s: s.PutModel(pb.PutModelRequest(spec=pb.ModelSpec(name="m", backend="/bin/sh"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not in the catalog",
    ),
    (
        lambda s: s.PutModel(
            pb.PutModelRequest(
                spec=pb.ModelSpec(name="m", backend="echo", model_file="../../etc/passwd")
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'..'",
    ),
    (
        lambda s: s.PutModel(
            pb.PutModelRequest(
                spec=pb.ModelSpec(name="m", backend="echo", model_file="/etc/passwd")
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "relative",
    ),
    (
        lambda s: s.DeleteModel(pb.DeleteModelRequest(name="echo")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "config",
    ),
    (
        lambda s: s.Release(pb.ReleaseRequest(lease_id="")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "lease_id",
    ),
    (
        lambda s: s.RenewLease(pb.RenewLeaseRequest(lease_id="gone")),
        grpc.StatusCode.NOT_FOUND,
        "Route again",
    ),
    (
        lambda s: s.Unload(pb.UnloadRequest()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model or a replica",
    ),
    (lambda s: s.Unload(pb.UnloadRequest(replica_id="zz")), grpc.StatusCode.NOT_FOUND, "zz"),
    (
        lambda s: s.UpdateSettings(
            pb.UpdateSettingsRequest(settings=pb.Settings(memory_threshold=3))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "memory_threshold",
    ),
    (
        lambda s: s.StreamLogs(pb.StreamLogsRequest(model="nope")).read(),
        grpc.StatusCode.NOT_FOUND,
        "nope",
    ),
]


async def test_bad_requests_get_precise_status(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ECHO_CATALOG) as d:
        for number, (call, code, needle) in enumerate(BAD_REQUESTS):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(d.stub)
            assert info.value.code() == code, (number, info.value.details())
            assert needle in (info.value.details() or ""), (number, info.value.details())
        health = health_pb2_grpc.HealthStub(d.channel)  # type: ignore[no-untyped-call]
        reply = await health.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


STUBBORN = """
[backends.stubborn]
command = ["{python}", "-m", "modeld.backends.echo", "--addr", "{addr}", "--ignore-sigterm"]
stop_grace = "30s"
[models.stubborn]
backend = "stubborn"
"""


async def test_second_signal_exits_fast_and_leaves_no_backend(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, STUBBORN, exit_code=130) as d:
        loaded = await d.stub.Load(pb.LoadRequest(model="stubborn"), timeout=30)
        pid = loaded.replicas[0].pid
        d.proc.send_signal(signal.SIGTERM)
        await d.wait_log(lambda e: e.get("to_state") == "STOPPING")
        started = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(d.proc.wait(), 10)
        assert code == 130
        assert time.monotonic() - started < 5, "the second signal did not cut the 30s grace"
        assert await wait_pids_gone([pid], 2) == []


async def test_api_models_are_capped(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, ECHO_CATALOG) as d:
        puts = [
            d.stub.PutModel(pb.PutModelRequest(spec=pb.ModelSpec(name=f"m{i}", backend="echo")))
            for i in range(MAX_API_MODELS + 5)
        ]
        results = await asyncio.gather(*puts, return_exceptions=True)
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(refused) == 5
        assert {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        listed = await d.stub.ListModels(pb.ListModelsRequest())
        assert len(listed.models) == MAX_API_MODELS + 1


async def test_a_gguf_model_without_an_estimate_counts_its_file_size(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(b"GGUF" + bytes(3 * 4096 - 4))
    catalog = ECHO_CATALOG + '[models.tiny]\nbackend = "echo"\nmodel_file = "tiny.gguf"\n'
    async with running_daemon(tmp_path, catalog) as d:
        loaded = await d.stub.Load(pb.LoadRequest(model="tiny"), timeout=30)
        assert loaded.replicas[0].memory == 3 * 4096
        listed = await d.stub.ListReplicas(pb.ListReplicasRequest(model="tiny"))
        assert [r.memory for r in listed.replicas] == [3 * 4096]
