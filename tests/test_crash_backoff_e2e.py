"""Crashes against the real daemon: a READY replica killed by SIGKILL is replaced on the
next Route or Load, while a backend that dies right after READY (a crash loop) backs off
with growing delays, and only a caller whose deadline ends first is refused."""

import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from daemon_proc import DaemonProc, running_daemon
from modeld._proto.modeld.v1 import modeld_pb2 as pb

BACKEND = Path(__file__).parent / "backends" / "options_backend.py"
# crash_loop_window = 0: no crash of a READY replica counts as a crash loop.
STABLE = """
[backends.echo]
command = ["{python}", "-m", "modeld.backends.echo", "--addr", "{addr}"]
stop_grace = "2s"
crash_loop_window = "0s"
[models.echo]
backend = "echo"
"""
# The backend exits 0.5 s after each load: READY (and the lease) come first even on a
# loaded machine, and the death is still well inside the 30 s crash-loop window.
LOOPING = f"""
[backends.looper]
command = ["{{python}}", "{BACKEND}", "--addr", "{{addr}}"]
stop_grace = "2s"
[models.loop]
backend = "looper"
options = {{ crash_after_load = "0.5" }}
"""


async def kill_replica(d: DaemonProc, replica_id: str) -> None:
    """SIGKILL a READY replica's process and wait until the daemon has dealt with it."""
    listed = await d.stub.ListReplicas(pb.ListReplicasRequest(model="echo"))
    [replica] = [r for r in listed.replicas if r.id == replica_id]
    assert replica.state == pb.READY
    os.kill(replica.pid, signal.SIGKILL)
    await d.wait_log(
        lambda e: (
            e.get("event") == "replica_crash_replaced_on_demand"
            and e.get("replica_id") == replica_id
        )
    )


async def test_route_and_load_right_after_a_ready_replica_is_killed_succeed(
    tmp_path: Path,
) -> None:
    async with running_daemon(tmp_path, STABLE) as d:
        first = await d.stub.Route(pb.RouteRequest(model="echo"), timeout=30)
        await kill_replica(d, first.replica_id)
        began = time.monotonic()
        second = await d.stub.Route(pb.RouteRequest(model="echo"), timeout=30)
        routed_s = time.monotonic() - began
        assert second.replica_id != first.replica_id
        assert second.cold_start
        await d.stub.Release(pb.ReleaseRequest(lease_id=second.lease_id))

        await kill_replica(d, second.replica_id)
        began = time.monotonic()
        loaded = await d.stub.Load(pb.LoadRequest(model="echo", replicas=1), timeout=30)
        print(f"after SIGKILL: Route {routed_s:.2f}s, Load {time.monotonic() - began:.2f}s")
        ready = [r for r in loaded.replicas if r.state == pb.READY]
        assert len(ready) == 1
        assert ready[0].id not in (first.replica_id, second.replica_id)
        assert not [e for e in d.log if e.get("event") == "model_backing_off"]


def backing_off(d: DaemonProc, failures: int) -> Any:
    return d.wait_log(
        lambda e: e.get("event") == "model_backing_off" and e.get("failures") == failures,
        limit_s=20,
    )


async def test_a_crash_loop_backs_off_with_growing_delays(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, LOOPING) as d:
        first = await d.stub.Route(pb.RouteRequest(model="loop"), timeout=30)
        one = await backing_off(d, 1)
        # This caller's deadline reaches past the backoff: it waits for the next attempt.
        second = await d.stub.Route(pb.RouteRequest(model="loop"), timeout=30)
        assert second.replica_id != first.replica_id
        two = await backing_off(d, 2)
        assert one["replica_id"] == first.replica_id
        assert two["replica_id"] == second.replica_id
        assert 0 < one["retry_in_s"] < two["retry_in_s"]
        assert "crash loop" in two["reason"]
        print(f"crash loop: backoff {one['retry_in_s']}s, then {two['retry_in_s']}s")

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await d.stub.Route(pb.RouteRequest(model="loop"), timeout=0.5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        message = info.value.details() or ""
        assert "backing off after 2 failure(s)" in message
        assert "next attempt at" in message
        assert f"replica {second.replica_id} died" in message
        assert "after READY: exited with code 3" in message
