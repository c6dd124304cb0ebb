"""ProbeCache on a fake clock: TTL reuse, coalescing, failures never cached as success."""

import asyncio

from modeld.clock import FakeClock
from modeld.routing.probe import ProbeCache

PROBE_TIMEOUT_S = 1.0


class Backend:
    """A Probeable whose answers and timing the test controls."""

    def __init__(self, rid: str = "r1") -> None:
        self.id = rid
        self.probe_timeout = PROBE_TIMEOUT_S
        self.healthy = True
        self.calls: list[float] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def probe(self, limit_s: float) -> bool:
        self.calls.append(limit_s)
        self.entered.set()
        answer = self.healthy
        if self.gate is not None:
            await self.gate.wait()
        return answer


def cache(clock: FakeClock, ttl: float = 30.0) -> ProbeCache:
    return ProbeCache(clock, lambda: ttl)


async def test_a_healthy_result_is_reused_until_the_ttl_passes() -> None:
    clock = FakeClock()
    probes, backend = cache(clock), Backend()
    first = await probes.check(backend)
    assert first.ok and first.at == clock.monotonic()
    clock.advance(29.9)
    assert await probes.check(backend) == first
    assert len(backend.calls) == 1
    clock.advance(0.1)
    assert not probes.fresh(backend.id)
    assert (await probes.check(backend)).at == clock.monotonic()
    assert backend.calls == [PROBE_TIMEOUT_S, PROBE_TIMEOUT_S]


async def test_force_probes_now() -> None:
    clock = FakeClock()
    probes, backend = cache(clock), Backend()
    await probes.check(backend)
    await probes.check(backend, force=True)
    assert len(backend.calls) == 2


async def test_a_failed_probe_is_recorded_but_never_reused() -> None:
    clock = FakeClock()
    probes, backend = cache(clock), Backend()
    backend.healthy = False
    for n in (1, 2, 3):
        result = await probes.check(backend)
        assert not result.ok
        assert probes.last(backend.id) == result
        assert not probes.fresh(backend.id)
        assert len(backend.calls) == n


async def test_concurrent_checks_share_one_probe() -> None:
    clock = FakeClock()
    probes, backend = cache(clock), Backend()
    backend.gate = asyncio.Event()
    checks = [asyncio.ensure_future(probes.check(backend, force=f)) for f in (False, True) * 5]
    await asyncio.wait_for(backend.entered.wait(), 1)
    backend.gate.set()
    results = await asyncio.gather(*checks)
    assert len(backend.calls) == 1
    assert len(set(results)) == 1


async def test_forget_disowns_a_probe_in_flight() -> None:
    clock = FakeClock()
    probes, backend = cache(clock), Backend()
    first_gate = backend.gate = asyncio.Event()
    stale = asyncio.ensure_future(probes.check(backend))
    await asyncio.wait_for(backend.entered.wait(), 1)
    probes.forget(backend.id)
    backend.gate = None
    backend.healthy = False
    fresh = await probes.check(backend)
    assert not fresh.ok
    assert len(backend.calls) == 2, "a forgotten probe in flight is not joined"
    clock.advance(1)
    first_gate.set()
    assert (await stale).ok, "its own caller still gets its answer"
    assert probes.last(backend.id) == fresh, "but the cache does not record it"
    assert not probes.fresh(backend.id)
