import grpc
from pathlib import Path

from cluster_proc import running_cluster, db_rows
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from pg import pg_dsn  # noqa: F401


async def test_smoke(tmp_path: Path, pg_dsn: str) -> None:
    async with running_cluster(tmp_path, pg_dsn, ["a", "b"]) as hosts:
        a, b = hosts["a"], hosts["b"]
        loaded = await a.stub.Load(pb.LoadRequest(model="echo", host="b"), timeout=30)
        print(loaded)
        print(await db_rows(pg_dsn, "select * from modeld_replicas"))
        r = await a.stub.Route(pb.RouteRequest(model="echo"), timeout=10)
        print(r)
