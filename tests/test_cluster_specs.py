"""Model specs shared by the cluster, with real daemons and PostgreSQL: PutModel on one
host is seen by all, DeleteModel on another removes it everywhere, a host whose config
disagrees says so at start naming the fields, and PutModel without the database is
UNAVAILABLE naming it.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest

from cluster_proc import db_rows, running_cluster, start_host
from daemon_proc import DaemonProc
from faultproxy import FaultProxy
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.cluster.specs import diverging_fields
from modeld.spec import ModelSpec

pytestmark = pytest.mark.timeout(90)


def event(name: str, **fields: object) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("event") == name and all(e.get(k) == v for k, v in fields.items())


async def names(daemon: DaemonProc) -> set[str]:
    reply = await daemon.stub.ListModels(pb.ListModelsRequest(), timeout=10)
    return {m.name for m in reply.models}


async def delete_once_gone(daemon: DaemonProc, model: str) -> pb.DeleteModelResponse:
    """DeleteModel, again after each change of the daemon's view while the replicas
    it has seen stopping are still in it."""
    for _ in range(20):
        seen = {id(e) for e in daemon.log}
        try:
            reply: pb.DeleteModelResponse = await daemon.stub.DeleteModel(
                pb.DeleteModelRequest(name=model), timeout=10
            )
            return reply
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.FAILED_PRECONDITION:
                raise
        await daemon.wait_log(
            lambda e, seen=seen: id(e) not in seen and e.get("event") == "cluster_view_changed",
            10,
        )
    raise AssertionError(f"{model} never stopped running in the view")


def test_diverging_fields_names_what_differs_but_not_the_source() -> None:
    mine = ModelSpec(name="m", backend="echo", max_replicas=1, idle_ttl=5.0)
    theirs = ModelSpec(name="m", backend="echo", max_replicas=2, source="api")
    assert diverging_fields(mine, theirs) == ["idle_ttl", "max_replicas"]
    assert diverging_fields(mine, mine.with_source("api")) == []


async def test_put_on_one_host_is_seen_by_all_and_delete_on_another_removes_it(
    tmp_path: Path, pg_dsn: str
) -> None:
    async with running_cluster(tmp_path, pg_dsn, ["a", "b", "c"]) as hosts:
        a, b, c = hosts["a"], hosts["b"], hosts["c"]
        spec = pb.ModelSpec(name="shared", backend="echo", max_replicas=2, options={"k": "v"})
        put = await a.stub.PutModel(pb.PutModelRequest(spec=spec), timeout=10)
        assert put.source == "api"
        for daemon in (b, c):
            await daemon.wait_log(event("model_put", model="shared", by="cluster"), 10)
            reply = await daemon.stub.ListModels(pb.ListModelsRequest(), timeout=10)
            seen = next(m for m in reply.models if m.name == "shared")
            assert seen.max_replicas == 2 and dict(seen.options) == {"k": "v"}
        rows = await db_rows(pg_dsn, "SELECT name, updated_by FROM modeld_models")
        assert [(r["name"], r["updated_by"]) for r in rows] == [("shared", "a")]

        # A running replica anywhere in the cluster blocks the delete, naming its host.
        await a.stub.Load(pb.LoadRequest(model="shared", host="c"), timeout=30)
        await b.wait_log(
            lambda e: (
                e.get("event") == "cluster_view_changed"
                and any(r.startswith("c/") for r in e.get("ready", []))
            ),
            10,
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await b.stub.DeleteModel(pb.DeleteModelRequest(name="shared"), timeout=10)
        assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "c" in (refused.value.details() or "")
        await c.stub.Unload(pb.UnloadRequest(model="shared"), timeout=30)
        deleted = await delete_once_gone(b, "shared")
        assert deleted.deleted
        for daemon in (a, c):
            await daemon.wait_log(event("model_deleted", model="shared", by="cluster"), 10)
        for daemon in (a, b, c):
            assert "shared" not in await names(daemon)
        assert await db_rows(pg_dsn, "SELECT 1 FROM modeld_models") == []
        again = await c.stub.DeleteModel(pb.DeleteModelRequest(name="shared"), timeout=10)
        assert not again.deleted


async def test_a_missed_notification_is_covered_by_the_resync(tmp_path: Path, pg_dsn: str) -> None:
    async with running_cluster(tmp_path, pg_dsn, ["a", "b"]) as hosts:
        a, b = hosts["a"], hosts["b"]
        # b's one connection (its LISTEN) is killed: the NOTIFY may reach nobody.
        await db_rows(
            pg_dsn,
            "SELECT pg_terminate_backend(pid, 2000) FROM pg_stat_activity "
            "WHERE application_name LIKE 'modeld%/b' AND datname = current_database()",
        )
        # A row this modeld cannot read (as a broken writer might leave) is named, and
        # does not keep the others from being applied.
        await db_rows(
            pg_dsn,
            "INSERT INTO modeld_models (name, spec, version, updated_by) "
            """VALUES ('broken', '{"backend": "echo"}', 0, 'test')""",
        )
        spec = pb.ModelSpec(name="late", backend="echo")
        await a.stub.PutModel(pb.PutModelRequest(spec=spec), timeout=10)
        await b.wait_log(event("model_put", model="late", by="cluster"), 10)
        assert "late" in await names(b)
        said = await b.wait_log(event("cluster_spec_unusable", model="broken"), 10)
        assert "cannot be read" in said["reason"]
        assert "broken" not in await names(b)


async def test_a_host_whose_config_disagrees_names_the_fields_at_start(
    tmp_path: Path, pg_dsn: str
) -> None:
    async with running_cluster(tmp_path, pg_dsn, ["a"]) as hosts:
        spec = pb.ModelSpec(name="tuned", backend="echo", max_replicas=2, pinned=True)
        await hosts["a"].stub.PutModel(pb.PutModelRequest(spec=spec), timeout=10)
        extra = '\n[models.tuned]\nbackend = "echo"\nmax_replicas = 1\n'
        d = await start_host(tmp_path, pg_dsn, "d", extra=extra)
        try:
            said = await d.wait_log(event("cluster_spec_diverges", model="tuned"), 10)
            assert said["fields"] == ["max_replicas", "pinned"]
            assert said["kept"] == "config"
            reply = await d.stub.ListModels(pb.ListModelsRequest(), timeout=10)
            mine = next(m for m in reply.models if m.name == "tuned")
            assert mine.source == "config" and mine.max_replicas == 1
            # This host's config model is changed in its config, not through the API.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await d.stub.PutModel(pb.PutModelRequest(spec=spec), timeout=10)
            assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        finally:
            await d.stop()
            await d.close()


async def test_put_model_without_the_database_is_unavailable_naming_it(
    tmp_path: Path, pg_dsn: str
) -> None:
    target = urlsplit(pg_dsn)
    proxy = await FaultProxy.start(target.hostname or "127.0.0.1", target.port or 5432)
    try:
        async with running_cluster(tmp_path, proxy.dsn(pg_dsn), ["a"]) as hosts:
            proxy.cut()
            spec = pb.ModelSpec(name="offline", backend="echo")
            with pytest.raises(grpc.aio.AioRpcError) as down:
                await hosts["a"].stub.PutModel(pb.PutModelRequest(spec=spec), timeout=20)
            assert down.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "cluster database" in (down.value.details() or "")
            assert f"127.0.0.1:{proxy.port}" in (down.value.details() or "")
            proxy.restore()
    finally:
        await proxy.close()
    assert await db_rows(pg_dsn, "SELECT 1 FROM modeld_models") == []
