"""The benchmark's reference router: what LocalAI does on every inference request.

A grpc.aio server on uvloop with the same `modeld.v1.ModelControl` service, where
only Route, Release and Ping are implemented. Every Route and every Release is one
serialized SQLite transaction (`BEGIN IMMEDIATE`, `synchronous=FULL`, WAL) on the
registry's schema: Route picks the best READY replica in SQL (fewest in-flight,
then oldest last use, then most free memory, then id), bumps its counters and
records the lease; Release deletes the lease and gives its slot back.

    python bench/reference.py --addr 127.0.0.1:PORT --db /tmp/x/reference.db
"""

import argparse
import asyncio
import signal
import sys
import time
import uuid
from pathlib import Path

import aiosqlite
import grpc
import uvloop
from google.protobuf.timestamp_pb2 import Timestamp

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc
from modeld.state import ReplicaState
from modeld.storage.registry import Registry, ReplicaRow

MODEL = "echo"
LEASE_TTL_S = 600.0
SEED_REPLICAS = 2

CREATE_LEASES = """CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,
    replica_id TEXT NOT NULL,
    expires_at REAL NOT NULL
)"""
PICK = """SELECT id, address FROM replicas
    WHERE node_id = 'local' AND model = ? AND state = ?
    ORDER BY in_flight, last_used, free_memory DESC, id
    LIMIT 1"""
TAKE = "UPDATE replicas SET in_flight = in_flight + 1, last_used = ? WHERE id = ?"
RECORD = "INSERT INTO leases (id, replica_id, expires_at) VALUES (?, ?, ?)"
FORGET = "DELETE FROM leases WHERE id = ? RETURNING replica_id"
GIVE_BACK = "UPDATE replicas SET in_flight = in_flight - 1 WHERE id = ? AND in_flight > 0"


class ReferenceControl(pb_grpc.ModelControlServicer):
    """Route/Release as one database transaction each, the way LocalAI routes."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def Ping(
        self,
        request: pb.PingRequest,
        context: grpc.aio.ServicerContext[pb.PingRequest, pb.PingResponse],
    ) -> pb.PingResponse:
        return pb.PingResponse()

    async def Route(
        self,
        request: pb.RouteRequest,
        context: grpc.aio.ServicerContext[pb.RouteRequest, pb.RouteResponse],
    ) -> pb.RouteResponse:
        lease_id = uuid.uuid4().hex
        now = time.time()

        async def take(db: aiosqlite.Connection) -> tuple[str, str] | None:
            async with db.execute(PICK, (request.model, ReplicaState.READY.value)) as cur:
                row = await cur.fetchone()
            if row is None:
                return None
            await db.execute(TAKE, (now, row[0]))
            await db.execute(RECORD, (lease_id, row[0], now + LEASE_TTL_S))
            return str(row[0]), str(row[1])

        picked = await self._registry.write(take)
        if picked is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"no READY replica of {request.model}")
        replica_id, address = picked
        expires = Timestamp()
        expires.FromNanoseconds(int((now + LEASE_TTL_S) * 1e9))
        return pb.RouteResponse(
            lease_id=lease_id,
            replica_id=replica_id,
            address=address,
            protocol=pb.GRPC,
            lease_expires_at=expires,
        )

    async def Release(
        self,
        request: pb.ReleaseRequest,
        context: grpc.aio.ServicerContext[pb.ReleaseRequest, pb.ReleaseResponse],
    ) -> pb.ReleaseResponse:
        async def give_back(db: aiosqlite.Connection) -> bool:
            async with db.execute(FORGET, (request.lease_id,)) as cur:
                row = await cur.fetchone()
            if row is None:
                return False
            await db.execute(GIVE_BACK, (row[0],))
            return True

        return pb.ReleaseResponse(released=await self._registry.write(give_back))


async def open_seeded(path: Path) -> Registry:
    """A fresh registry (the daemon's schema, synchronous=FULL) with READY replicas."""
    for stale in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        stale.unlink(missing_ok=True)
    registry = await Registry.open(path, synchronous="FULL")

    async def create(db: aiosqlite.Connection) -> None:
        await db.execute(CREATE_LEASES)

    await registry.write(create)
    for n in range(SEED_REPLICAS):
        row = ReplicaRow(
            id=f"ref{n}",
            model=MODEL,
            backend="echo",
            state=ReplicaState.READY.value,
            address=f"127.0.0.1:{40000 + n}",
            started_at=time.time(),
            ready_at=time.time(),
        )
        await registry.insert_replica(row)
    return registry


async def serve(addr: str, db_path: Path) -> int:
    registry = await open_seeded(db_path)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_ModelControlServicer_to_server(ReferenceControl(registry), server)  # type: ignore[no-untyped-call]
    if server.add_insecure_port(addr) == 0:
        print(f"reference: cannot listen on {addr}", file=sys.stderr)
        await registry.close()
        return 1
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)
    await registry.close()
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", required=True, help="HOST:PORT to listen on")
    parser.add_argument("--db", required=True, type=Path, help="database file (recreated)")
    ns = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        sys.exit(runner.run(serve(ns.addr, ns.db)))


if __name__ == "__main__":
    main()
