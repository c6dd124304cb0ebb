"""GPU memory of stopped replicas: held while NVML lists their pids, then released.

Unit tests drive `Releasing` with a fake clock and a fake process list; the end-to-end
tests run the real daemon with the fake resource reader listing a stopped replica's pid.
"""

import asyncio
from pathlib import Path

from structlog.testing import capture_logs

from daemon_proc import running_daemon
from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.capacity.releasing import Releasing
from modeld.capacity.resources import FakeReader, write_fake
from modeld.clock import FakeClock, SystemClock
from modeld.policy.view import GpuView, HostView

GIB = 1 << 30


class Listing:
    """What NVML lists per GPU, and how often it was asked."""

    def __init__(self, listed: dict[int, set[int]] | None = None, reads_listed: int = -1) -> None:
        self.listed = listed or {}
        self.reads = 0
        self._reads_listed = reads_listed  # after this many reads the list is empty

    def __call__(self) -> dict[int, set[int]]:
        self.reads += 1
        if self.reads > self._reads_listed >= 0:
            return {}
        return {gpu: set(pids) for gpu, pids in self.listed.items()}


async def test_nothing_pending_reads_nothing() -> None:
    listing = Listing({0: {42}})
    releasing = Releasing(FakeClock(), listing)
    releasing.add("cpu-only", (), [42])
    assert await releasing.held() == {}
    await releasing.wait_released(deadline=0.0)
    assert listing.reads == 0


async def test_held_while_listed_on_its_gpu_and_released_when_not() -> None:
    listing = Listing({0: {7}, 1: {42}})
    releasing = Releasing(FakeClock(), listing)
    releasing.add("r1", (1,), [41, 42])
    releasing.add("r2", (0,), [42])  # 42 is listed, but on another GPU
    with capture_logs() as logs:
        assert await releasing.held() == {1: ["r1"]}
        listing.listed = {0: {7}}
        assert await releasing.held() == {}
    assert [(e["event"], e["replica_id"]) for e in logs] == [
        ("gpu_memory_released", "r2"),
        ("gpu_memory_released", "r1"),
    ]


async def test_a_pid_listed_past_the_timeout_is_dropped_and_logged() -> None:
    clock = FakeClock()
    releasing = Releasing(clock, Listing({0: {42}}), timeout_s=30.0)
    releasing.add("r1", (0,), [42])
    clock.advance(29.0)
    assert await releasing.held() == {0: ["r1"]}
    clock.advance(1.0)
    with capture_logs() as logs:
        assert await releasing.held() == {}
    assert logs[0]["event"] == "gpu_memory_release_timeout"
    assert logs[0]["pids"] == [42] and logs[0]["gpus"] == [0]


async def test_wait_released_returns_once_the_pid_is_gone_or_at_the_deadline() -> None:
    clock = SystemClock()
    listing = Listing({0: {42}}, reads_listed=4)
    releasing = Releasing(clock, listing, interval_s=0.01)
    releasing.add("r1", (0,), [42])
    # Still listed at the deadline: it returns, and the entry stays.
    await releasing.wait_released(deadline=clock.monotonic())
    assert await releasing.held() == {0: ["r1"]}
    assert listing.reads == 2
    # Listed for two more reads, then gone: the wait returns after the fifth.
    await releasing.wait_released(deadline=clock.monotonic() + 30)
    assert listing.reads == 5 and await releasing.held() == {}


def test_fake_reader_lists_processes_per_gpu(tmp_path: Path) -> None:
    path = tmp_path / "resources.json"
    gpus = (GpuView(0, "GPU-0", "Fake", GIB, 0), GpuView(1, "GPU-1", "Fake", GIB, 0))
    write_fake(path, HostView(GIB, GIB, gpus), {9: 1}, gpu_pids={1: [42]})
    assert FakeReader(path).gpu_processes() == {0: {9}, 1: {42, 9}}


HOST = HostView(64 * GIB, 32 * GIB, (GpuView(0, "GPU-fake-0", "Fake", 24 * GIB, 0),))
BUSY = HostView(64 * GIB, 32 * GIB, (GpuView(0, "GPU-fake-0", "Fake", 24 * GIB, 16 * GIB),))


def release_config(tmp_path: Path, timeout: str) -> str:
    fake = tmp_path / "resources.json"
    write_fake(fake, HOST)
    return (
        f'[resources]\nfake_path = "{fake}"\nrelease_timeout = "{timeout}"\n'
        "[backends.echo]\n"
        'command = ["{python}", "-m", "modeld.backends.echo", "--addr", "{addr}"]\n'
        'stop_grace = "2s"\n'
        '[models.a]\nbackend = "echo"\nmemory_estimate = "16GiB"\n'
        '[models.b]\nbackend = "echo"\nmemory_estimate = "16GiB"\n'
    )


def first_index(log: list[dict[str, object]], event: str, **match: object) -> int:
    for i, e in enumerate(log):
        if e.get("event") == event and all(e.get(k) == v for k, v in match.items()):
            return i
    raise AssertionError(f"no {event} log line with {match}")


async def test_admission_waits_until_the_gpu_no_longer_lists_a_stopped_replica(
    tmp_path: Path,
) -> None:
    async with running_daemon(tmp_path, release_config(tmp_path, "5m")) as d:
        (a,) = (await d.stub.Load(pb.LoadRequest(model="a"), timeout=30)).replicas
        fake = tmp_path / "resources.json"
        write_fake(fake, BUSY, gpu_pids={0: [a.pid]})
        await d.stub.Unload(pb.UnloadRequest(model="a"), timeout=30)

        load_b = asyncio.ensure_future(d.stub.Load(pb.LoadRequest(model="b"), timeout=30))
        await d.wait_log(lambda e: e.get("event") == "admission_waiting_for_release")
        listed = await d.stub.ListReplicas(pb.ListReplicasRequest(model="b"))
        # Only a start waiting in admission (ADMITTING, no process) may be listed.
        started = [r for r in listed.replicas if r.state != pb.ADMITTING or r.pid]
        assert started == [], "b started into memory a's process still holds"

        write_fake(fake, HOST)
        (b,) = (await load_b).replicas
        assert b.state == pb.READY
        released = first_index(d.log, "gpu_memory_released", replica_id=a.id)
        assert released < first_index(d.log, "replica_state", replica_id=b.id)


async def test_a_gpu_that_keeps_listing_the_pid_is_given_up_on_after_the_timeout(
    tmp_path: Path,
) -> None:
    async with running_daemon(tmp_path, release_config(tmp_path, "1s")) as d:
        (a,) = (await d.stub.Load(pb.LoadRequest(model="a"), timeout=30)).replicas
        write_fake(tmp_path / "resources.json", HOST, gpu_pids={0: [a.pid]})
        await d.stub.Unload(pb.UnloadRequest(model="a"), timeout=30)
        (b,) = (await d.stub.Load(pb.LoadRequest(model="b"), timeout=30)).replicas
        timed_out = first_index(d.log, "gpu_memory_release_timeout", replica_id=a.id)
        assert timed_out < first_index(d.log, "replica_state", replica_id=b.id)
        assert d.log[timed_out]["pids"] == [a.pid]
