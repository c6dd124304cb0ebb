"""Start backoff carried out by the pool, on a fake clock with fake replicas: a failed
start or a crash loop backs off with growing delays, a crash of a long-READY replica
does not, and callers wait out a backoff their deadline reaches past."""

import asyncio
from pathlib import Path

import pytest

from modeld.errors import Unavailable
from modeld.policy.backoff import DEFAULT
from modeld.spec import ModelSpec
from modeld.state import ReplicaState
from routing_fakes import FakeReplica, Harness, router_harness

S = ReplicaState
M = ModelSpec(name="m", backend="echo", max_replicas=2)
WINDOW = DEFAULT.crash_loop_window


def crash(h: Harness, replica: FakeReplica, reason: str = "killed by signal SIGKILL") -> None:
    """What the router does on a READY replica's FAILED event."""
    replica.state = S.FAILED
    h.router.pool("m").note_crash(reason, replica.id)


async def test_a_failed_cold_start_fails_every_waiter_alike_then_backs_off(
    tmp_path: Path,
) -> None:
    async with router_harness(tmp_path, M) as h:
        h.scripts["m"] = [{"fail": "exit code 7"}]
        results = await asyncio.gather(
            *(h.router.route("m", h.deadline()) for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(r, Unavailable) for r in results)
        assert len({str(r) for r in results}) == 1
        assert len(h.made) == 1
        with pytest.raises(Unavailable) as info:
            await h.router.route("m", h.deadline(0.5))
        message = str(info.value)
        assert "backing off after 1 failure(s)" in message
        assert "in 1.0s), after this call's deadline" in message
        assert "exit code 7" in message
        assert len(h.made) == 1


async def test_a_caller_whose_deadline_reaches_past_the_backoff_waits_it_out(
    tmp_path: Path,
) -> None:
    async with router_harness(tmp_path, M) as h:
        h.scripts["m"] = [{"fail": "exit code 7"}]
        with pytest.raises(Unavailable):
            await h.router.route("m", h.deadline())
        waiting = asyncio.ensure_future(h.router.route("m", h.deadline(30)))
        joined = asyncio.ensure_future(h.router.route("m", h.deadline(30)))
        await asyncio.sleep(0)  # one step: both Routes reach the shared start
        assert h.router.pool("m").pending() == 1
        # A caller that cannot wait 1 s is refused even while others wait.
        with pytest.raises(Unavailable, match="next attempt at"):
            await h.router.route("m", h.deadline(0.9))
        assert not waiting.done()
        assert len(h.made) == 1
        h.clock.advance(1.0)
        first, second = await asyncio.gather(waiting, joined)
        assert first.replica_id == second.replica_id == h.made[1].id
        assert len(h.made) == 2


async def test_failures_double_up_to_the_cap_and_a_short_success_does_not_reset_them(
    tmp_path: Path,
) -> None:
    async with router_harness(tmp_path, M) as h:
        pool = h.router.pool("m")
        h.scripts["m"] = [{"fail": f"failure {n}"} for n in range(1, 12)]
        waits = []
        for _ in range(11):
            with pytest.raises(Unavailable):
                await h.router.lifecycle.start(pool, M, h.deadline(1000))
            assert pool.backoff is not None
            waits.append(pool.backoff.not_before - h.clock.monotonic())
            with pytest.raises(Unavailable, match=r"failure \d+"):
                pool.check_backoff()
            h.clock.advance(waits[-1])
            assert pool.check_backoff() == h.clock.monotonic()
        assert waits == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
        await h.router.lifecycle.start(pool, M, h.deadline())
        h.scripts["m"] = [{"fail": "again"}]
        with pytest.raises(Unavailable):
            await h.router.lifecycle.start(pool, M, h.deadline())
        assert pool.backoff is not None
        assert pool.backoff.failures == 12
        assert pool.backoff.not_before - h.clock.monotonic() == 300


async def test_failures_are_forgotten_once_a_start_stays_ready_for_the_window(
    tmp_path: Path,
) -> None:
    async with router_harness(tmp_path, M) as h:
        pool = h.router.pool("m")
        h.scripts["m"] = [{"fail": "one"}, {"fail": "two"}]
        for wait in (1.0, 2.0):
            with pytest.raises(Unavailable):
                await h.router.lifecycle.start(pool, M, h.deadline())
            h.clock.advance(wait)
        await h.router.lifecycle.start(pool, M, h.deadline())
        h.clock.advance(WINDOW)
        h.scripts["m"] = [{"fail": "three"}]
        with pytest.raises(Unavailable):
            await h.router.lifecycle.start(pool, M, h.deadline())
        assert pool.backoff is not None
        assert pool.backoff.failures == 1


async def test_a_crash_of_a_long_ready_replica_is_replaced_at_once(tmp_path: Path) -> None:
    async with router_harness(tmp_path, M) as h:
        first = await h.router.route("m", h.deadline())
        h.clock.advance(WINDOW)
        crash(h, h.made[0])
        assert h.router.pool("m").backoff is None
        lease = await h.router.route("m", h.deadline(0.01))
        assert lease.replica_id == h.made[1].id != first.replica_id
        assert lease.cold_start


async def test_a_crash_soon_after_ready_is_a_crash_loop_with_growing_delays(
    tmp_path: Path,
) -> None:
    async with router_harness(tmp_path, M) as h:
        pool = h.router.pool("m")
        delays = []
        for n in range(1, 4):
            await h.router.route("m", h.deadline(100))
            h.clock.advance(0.2)
            crash(h, h.made[-1], f"crash {n}")
            assert pool.backoff is not None
            delays.append(pool.backoff.not_before - h.clock.monotonic())
            with pytest.raises(Unavailable, match=f"after {n} failure.*crash {n}"):
                await h.router.route("m", h.deadline(0.1))
            h.clock.advance(delays[-1])
        assert delays == [1.0, 2.0, 4.0]
        assert len(h.made) == 3


async def test_a_load_waits_out_the_backoff_or_is_refused_by_its_deadline(
    tmp_path: Path,
) -> None:
    async with router_harness(tmp_path, M) as h:
        h.scripts["m"] = [{"fail": "exit code 7"}]
        with pytest.raises(Unavailable):
            await h.router.load("m", 1, h.deadline())
        with pytest.raises(Unavailable, match="next attempt at"):
            await h.router.load("m", 1, h.deadline(0.5))
        load = asyncio.ensure_future(h.router.load("m", 1, h.deadline(30)))
        await asyncio.sleep(0)  # one step: the Load's start waits for the backoff
        assert h.router.pool("m").pending() == 1
        h.clock.advance(1.0)
        [info] = await load
        assert info.id == h.made[1].id
        assert info.state is S.READY
