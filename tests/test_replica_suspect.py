"""A busy, healthy replica is never stopped on a slow probe or a client's report
(issue 21, finding 1), against the real daemon and two http test backends whose
health answers the test holds back (as a server busy with completions does).

A slow probe or a Release with BACKEND_UNREACHABLE makes the replica SUSPECT: it
stays READY, its leases stay valid, new Routes go to the other replica, and one
answer clears it; only `probe_failures` failed probes in a row over `probe_window`
declare it dead and stop it.
"""

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from backend_proc import free_port
from daemon_proc import DaemonProc, running_daemon
from modeld._proto.modeld.v1 import modeld_pb2 as pb

BACKEND = Path(__file__).parent / "backends" / "http_backend.py"
WAIT_S = 30.0


def catalog(control: Path, metrics_port: int) -> str:
    return f"""
metrics_listen = "127.0.0.1:{metrics_port}"
[backends.busy]
command = ["{{python}}", "{BACKEND}", "--host", "{{host}}", "--port", "{{port}}",
           "--model", "{{model_file}}", "--ready-file", "{{model_file}}",
           "--control-dir", "{control}", "--quiet"]
protocol = "http"
stop_grace = "2s"
probe_timeout = "600ms"
probe_failures = 3
probe_window = "1500ms"
[models.busy]
backend = "busy"
model_file = "tiny.gguf"
max_replicas = 2
"""


class Events:
    """The daemon's replica events, read in order by whoever waits for one."""

    def __init__(self, d: DaemonProc) -> None:
        self._stream = d.stub.WatchEvents(pb.WatchEventsRequest(model="busy"))
        self._iter: AsyncIterator[pb.Event] = aiter(self._stream)

    @classmethod
    async def watch(cls, d: DaemonProc) -> "Events":
        """Subscribed once this returns (a Ping follows the call in order)."""
        events = cls(d)
        await d.stub.Ping(pb.PingRequest(), timeout=10)
        return events

    async def next_of(self, replica_id: str) -> pb.Event:
        async def one() -> pb.Event:
            async for event in self._iter:
                if event.replica_id == replica_id:
                    return event
            raise AssertionError("the event stream ended")

        return await asyncio.wait_for(one(), WAIT_S)

    def close(self) -> None:
        self._stream.cancel()


async def replicas(d: DaemonProc) -> dict[str, pb.Replica]:
    listed = await d.stub.ListReplicas(pb.ListReplicasRequest(model="busy"))
    return {r.id: r for r in listed.replicas}


def metric(port: int, judgment: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    prefix = f'modeld_replica_health_total{{judgment="{judgment}"}} '
    return next(
        (float(ln.removeprefix(prefix)) for ln in text.splitlines() if ln.startswith(prefix)), 0.0
    )


async def test_a_busy_replica_is_suspect_not_stopped_until_proven_dead(tmp_path: Path) -> None:
    control = tmp_path / "control"
    control.mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.gguf").write_bytes(b"GGUF")
    metrics_port = free_port()
    async with running_daemon(tmp_path, catalog(control, metrics_port)) as d:
        await d.stub.Load(pb.LoadRequest(model="busy", replicas=2), timeout=WAIT_S)
        leases = [await d.stub.Route(pb.RouteRequest(model="busy")) for _ in range(4)]
        busy = leases[0].replica_id
        mine = [lease for lease in leases if lease.replica_id == busy]
        assert len(mine) == 2, "two leases on each of the two replicas"
        other = next(rid for rid in await replicas(d) if rid != busy)
        pid = (await replicas(d))[busy].pid
        hang = control / f"hang-{mine[0].address.rsplit(':', 1)[1]}"
        events = await Events.watch(d)
        try:
            # Its health answers wait behind its (pretend) queue; a client times out.
            hang.touch()
            await d.stub.Release(
                pb.ReleaseRequest(lease_id=mine[0].lease_id, outcome=pb.BACKEND_UNREACHABLE)
            )
            event = await events.next_of(busy)
            assert (event.health, event.to_state) == ("SUSPECT", pb.READY), event
            assert "unreachable" in event.reason
            listed = (await replicas(d))[busy]
            assert listed.state == pb.READY and listed.suspect, listed
            # Its lease is still good, and new Routes go to the other replica.
            await d.stub.RenewLease(pb.RenewLeaseRequest(lease_id=mine[1].lease_id))
            routed = [await d.stub.Route(pb.RouteRequest(model="busy")) for _ in range(3)]
            assert {lease.replica_id for lease in routed} == {other}
            for lease in routed:
                await d.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id))

            # The queue empties: the next probe answers and clears it.
            hang.unlink()
            event = await events.next_of(busy)
            assert (event.health, event.to_state) == ("HEALTHY", pb.READY), event
            listed = (await replicas(d))[busy]
            assert (listed.state, listed.suspect, listed.pid) == (pb.READY, "", pid)
            await d.stub.RenewLease(pb.RenewLeaseRequest(lease_id=mine[1].lease_id))

            # It stops answering for good: a failed health probe, then failures in a row
            # over probe_window prove it dead, and only then is it stopped.
            hang.touch()
            await d.stub.Health(pb.HealthRequest(model="busy", probe=True), timeout=WAIT_S)
            event = await events.next_of(busy)
            assert (event.health, event.to_state) == ("SUSPECT", pb.READY), event
            assert "health probe failed" in event.reason
            event = await events.next_of(busy)
            assert (event.health, event.to_state) == ("DEAD", pb.READY), event
            assert "3 probes in a row failed" in event.reason
            event = await events.next_of(busy)
            assert event.to_state in (pb.DRAINING, pb.STOPPING), event
            hang.unlink()
        finally:
            events.close()
        assert await asyncio.to_thread(metric, metrics_port, "SUSPECT") == 2
        assert await asyncio.to_thread(metric, metrics_port, "HEALTHY") == 1
        assert await asyncio.to_thread(metric, metrics_port, "DEAD") == 1
        for lease in leases:
            if lease.replica_id == other:
                await d.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id))
        try:
            await d.stub.RenewLease(pb.RenewLeaseRequest(lease_id=mine[1].lease_id))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
        else:
            raise AssertionError("a lease on a replica proven dead was renewed")
