"""The watchdog and admission end to end: the real daemon, real demo backends, fake readings.

Each test writes the resource readings the daemon sees (`[resources] fake_path`) and
follows replica events over WatchEvents; nothing waits on a sleep.
"""

import asyncio
import contextlib
import os
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path

import grpc
import pytest

from backend_proc import free_port
from daemon_proc import DaemonProc, pids_alive, running_daemon, start_daemon, wait_pids_gone
from daemon_proc import write_config as daemon_config
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.capacity.resources import write_fake
from modeld.policy.view import GpuView, HostView

GIB = 1 << 30
WAIT = 20.0
NO_GPUS = HostView(64 * GIB, 32 * GIB, ())
ECHO = """
[backends.echo]
command = ["{python}", "-m", "modeld.backends.echo", "--addr", "{addr}"]
stop_grace = "2s"
"""


def config(tmp_path: Path, body: str, readings: HostView = NO_GPUS, top: str = "") -> str:
    """Top-level keys, the echo backend, the fake readings file, then `body`'s tables."""
    fake = tmp_path / "resources.json"
    write_fake(fake, readings)
    return f'{top}{ECHO}\n[resources]\nfake_path = "{fake}"\n{body}'


def models(*names: str, **extra: str) -> str:
    lines = "".join(f"{key} = {value}\n" for key, value in extra.items())
    return "".join(f'[models.{n}]\nbackend = "echo"\n{lines}' for n in names)


class Events:
    """Every replica event since it was opened, and a way to await one."""

    def __init__(self, d: DaemonProc) -> None:
        self.seen: list[pb.Event] = []
        self._changed = asyncio.Condition()
        self._call = d.stub.WatchEvents(pb.WatchEventsRequest())
        self._pump = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for event in self._call:
            async with self._changed:
                self.seen.append(event)
                self._changed.notify_all()

    async def wait(self, match: Callable[[pb.Event], bool], limit_s: float = WAIT) -> pb.Event:
        async def found() -> pb.Event:
            async with self._changed:
                while not (hits := [e for e in self.seen if match(e)]):
                    await self._changed.wait()
                return hits[0]

        return await asyncio.wait_for(found(), limit_s)

    async def state(self, replica_id: str, state: int, limit_s: float = WAIT) -> pb.Event:
        return await self.wait(
            lambda e: e.replica_id == replica_id and e.to_state == state, limit_s
        )

    async def close(self) -> None:
        self._call.cancel()
        await asyncio.gather(self._pump, return_exceptions=True)


@contextlib.asynccontextmanager
async def events_of(d: DaemonProc) -> AsyncIterator[Events]:
    events = Events(d)
    try:
        yield events
    finally:
        await events.close()


async def route(d: DaemonProc, model: str, events: Events) -> pb.RouteResponse:
    """Route, then wait until the event stream has shown the replica READY."""
    lease = await d.stub.Route(pb.RouteRequest(model=model), timeout=WAIT)
    await events.state(lease.replica_id, pb.READY)
    return lease


async def replicas(d: DaemonProc) -> dict[str, pb.Replica]:
    listed = await d.stub.ListReplicas(pb.ListReplicasRequest())
    return {r.id: r for r in listed.replicas}


def evicted_lines(d: DaemonProc, replica_id: str) -> list[str]:
    return [
        e["reason"]
        for e in d.log
        if e.get("event") == "replica_evicted" and e.get("replica_id") == replica_id
    ]


async def scrape(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            body: bytes = reply.read()
            return body.decode()

    return await asyncio.to_thread(get)


async def test_max_loaded_stops_the_least_recently_used_for_the_third_model(
    tmp_path: Path,
) -> None:
    metrics_port = free_port()
    body = config(
        tmp_path,
        models("a", "b", "c") + '[watchdog]\nmax_loaded = 2\nwatchdog_interval = "100ms"\n',
        top=f'metrics_listen = "127.0.0.1:{metrics_port}"\n',
    )
    async with running_daemon(tmp_path, body) as d, events_of(d) as events:
        a = await route(d, "a", events)
        await d.stub.Release(pb.ReleaseRequest(lease_id=a.lease_id))
        b = await route(d, "b", events)
        await d.stub.Release(pb.ReleaseRequest(lease_id=b.lease_id))
        pids = {rid: r.pid for rid, r in (await replicas(d)).items()}
        c = await d.stub.Route(pb.RouteRequest(model="c"), timeout=WAIT)
        stopped = await events.state(a.replica_id, pb.STOPPED)
        assert stopped.reason == "lru"
        assert await wait_pids_gone([pids[a.replica_id]], 2) == []
        now = await replicas(d)
        assert now[c.replica_id].state == pb.READY and now[b.replica_id].state == pb.READY
        assert pids_alive([pids[b.replica_id]]) == [pids[b.replica_id]]
        assert evicted_lines(d, a.replica_id) == ["lru"]
        assert 'modeld_evictions_total{reason="lru"} 1.0' in await scrape(metrics_port)


async def test_idle_ttl_stops_a_replica_a_second_after_its_last_lease(tmp_path: Path) -> None:
    body = config(
        tmp_path, models("idle", idle_ttl='"1s"') + '[watchdog]\nwatchdog_interval = "100ms"\n'
    )
    async with running_daemon(tmp_path, body) as d, events_of(d) as events:
        lease = await route(d, "idle", events)
        pid = (await replicas(d))[lease.replica_id].pid
        # The lease is held longer than the TTL: only the time since it ended may count.
        await asyncio.sleep(1.3)
        assert (await replicas(d))[lease.replica_id].state == pb.READY
        await d.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id))
        stopped = await events.state(lease.replica_id, pb.STOPPED)
        assert stopped.reason == "idle"
        # Both times on the daemon's clock: the Release's log line is written just
        # after the lease ended, so the idle TTL is counted from no earlier than that.
        released = await d.wait_log(
            lambda e: (e.get("event"), e.get("method")) == ("rpc", "Release")
        )
        idle_for = stopped.time.ToMicroseconds() / 1e6 - _log_time(released)
        print(f"idle_ttl 1s: stopped {idle_for:.2f}s after the Release")
        assert idle_for >= 0.9, f"stopped {idle_for:.2f}s after the lease ended"
        assert await wait_pids_gone([pid], 2) == []
        assert evicted_lines(d, lease.replica_id) == ["idle"]


def _log_time(entry: dict[str, object]) -> float:
    return datetime.fromisoformat(str(entry["timestamp"])).timestamp()


async def test_a_new_watchdog_interval_applies_at_once(tmp_path: Path) -> None:
    body = config(
        tmp_path, models("idle", idle_ttl='"300ms"') + '[watchdog]\nwatchdog_interval = "1h"\n'
    )
    async with running_daemon(tmp_path, body) as d, events_of(d) as events:
        lease = await route(d, "idle", events)
        await d.stub.Release(pb.ReleaseRequest(lease_id=lease.lease_id))
        changes = pb.Settings()
        changes.watchdog_interval.FromMilliseconds(50)
        await d.stub.UpdateSettings(pb.UpdateSettingsRequest(settings=changes))
        # With the hour-long wait still running, nothing would stop it for an hour.
        stopped = await events.state(lease.replica_id, pb.STOPPED, limit_s=5)
        assert stopped.reason == "idle"


async def test_a_busy_replica_is_not_evicted_by_lru_while_its_lease_is_held(
    tmp_path: Path,
) -> None:
    body = config(tmp_path, models("a", "b") + "[watchdog]\nmax_loaded = 1\n")
    async with running_daemon(tmp_path, body) as d, events_of(d) as events:
        a = await route(d, "a", events)
        pid = (await replicas(d))[a.replica_id].pid
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await d.stub.Route(pb.RouteRequest(model="b"), timeout=1.0)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert pids_alive([pid]) == [pid]
        assert (await replicas(d))[a.replica_id].state == pb.READY
        waiting = await d.wait_log(lambda e: e.get("event") == "admission_waiting")
        assert "to become idle" in waiting["why"]
        await d.stub.Release(pb.ReleaseRequest(lease_id=a.lease_id))
        b = await d.stub.Route(pb.RouteRequest(model="b"), timeout=WAIT)
        assert (await events.state(a.replica_id, pb.STOPPED)).reason == "lru"
        assert await wait_pids_gone([pid], 2) == []
        assert (await replicas(d))[b.replica_id].state == pb.READY


async def test_a_waiting_route_starts_as_soon_as_the_lease_ends(tmp_path: Path) -> None:
    body = config(tmp_path, models("a", "b") + "[watchdog]\nmax_loaded = 1\n")
    async with running_daemon(tmp_path, body) as d, events_of(d) as events:
        a = await route(d, "a", events)
        waiting = asyncio.ensure_future(d.stub.Route(pb.RouteRequest(model="b"), timeout=WAIT))
        await d.wait_log(lambda e: e.get("event") == "admission_waiting")
        assert not waiting.done()
        await d.stub.Release(pb.ReleaseRequest(lease_id=a.lease_id))
        b = await waiting
        assert (await events.state(a.replica_id, pb.STOPPED)).reason == "lru"
        assert (await replicas(d))[b.replica_id].state == pb.READY


async def test_all_pinned_fails_at_once_naming_the_pinned_model(tmp_path: Path) -> None:
    body = config(
        tmp_path, models("keep", pinned="true") + models("other") + "[watchdog]\nmax_loaded = 1\n"
    )
    async with running_daemon(tmp_path, body) as d:
        await d.stub.Load(pb.LoadRequest(model="keep"), timeout=WAIT)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await d.stub.Route(pb.RouteRequest(model="other"), timeout=WAIT)
        # Refused from what is loaded, not after waiting out the Route's deadline.
        assert time.monotonic() - started < WAIT / 2
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "pinned model(s) keep" in (info.value.details() or "")
        listed = await replicas(d)
        assert [(r.model, r.state) for r in listed.values()] == [("keep", pb.READY)]


async def test_busy_timeout_restarts_a_stuck_replica(tmp_path: Path) -> None:
    body = config(
        tmp_path, models("stuck", busy_timeout='"1s"') + '[watchdog]\nwatchdog_interval = "100ms"\n'
    )
    async with running_daemon(tmp_path, body) as d, events_of(d) as events:
        lease = await route(d, "stuck", events)
        pid = (await replicas(d))[lease.replica_id].pid
        stopped = await events.state(lease.replica_id, pb.STOPPED, limit_s=5)
        assert stopped.reason == "busy_timeout"
        assert await wait_pids_gone([pid], 2) == []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await d.stub.RenewLease(pb.RenewLeaseRequest(lease_id=lease.lease_id))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        again = await d.stub.Route(pb.RouteRequest(model="stuck"), timeout=WAIT)
        assert again.replica_id != lease.replica_id and again.cold_start
        assert evicted_lines(d, lease.replica_id) == ["busy_timeout"]


async def test_gpu_with_most_free_memory_is_passed_as_cuda_visible_devices(
    tmp_path: Path,
) -> None:
    gpus = (
        GpuView(0, "GPU-fake-0", "Fake", 24 * GIB, 20 * GIB),
        GpuView(1, "GPU-fake-1", "Fake", 24 * GIB, 2 * GIB),
    )
    body = config(
        tmp_path, models("g", memory_estimate='"4GiB"'), HostView(64 * GIB, 32 * GIB, gpus)
    )
    async with running_daemon(tmp_path, body) as d:
        [replica] = (await d.stub.Load(pb.LoadRequest(model="g"), timeout=WAIT)).replicas
        assert replica.gpu == "1"
        environ = Path(f"/proc/{replica.pid}/environ").read_bytes().split(b"\0")
        assert b"CUDA_VISIBLE_DEVICES=1" in environ


async def test_settings_cli_changes_max_loaded_live_and_it_survives_a_restart(
    tmp_path: Path,
) -> None:
    path, addr = daemon_config(
        tmp_path, config(tmp_path, models("a", "b") + "[watchdog]\nmax_loaded = 1\n")
    )
    d = await start_daemon(path, addr)
    try:
        first = await d.stub.Load(pb.LoadRequest(model="a"), timeout=WAIT)
        cli = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "modeld.cli.main",
            "settings",
            "--addr",
            addr,
            "--max-loaded",
            "3",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if not k.startswith("MODELD_")},
        )
        out, err = await asyncio.wait_for(cli.communicate(), WAIT)
        assert cli.returncode == 0, err.decode()
        assert "max_loaded" in out.decode() and "3" in out.decode()
        assert (await d.stub.GetSettings(pb.GetSettingsRequest())).max_loaded == 3
        await d.stub.Load(pb.LoadRequest(model="b"), timeout=WAIT)
        states = {r.model: r.state for r in (await replicas(d)).values()}
        assert states == {"a": pb.READY, "b": pb.READY}, "max_loaded 1 still applied"
        assert first.replicas[0].state == pb.READY
        assert await d.stop() == 0
        d = await start_daemon(path, addr)
        assert (await d.stub.GetSettings(pb.GetSettingsRequest())).max_loaded == 3
    finally:
        await d.stop()
