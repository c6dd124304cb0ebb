"""Cached backend health probes.

A healthy result is reused for `ttl` seconds; a failed one is recorded (so
Health can show it) but never reused: the next check probes again. Concurrent
checks of one replica share a single probe.
"""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from modeld.clock import Clock


class Probeable(Protocol):
    @property
    def id(self) -> str: ...

    async def probe(self, limit_s: float) -> bool: ...


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    at: float  # monotonic
    wall: float


class ProbeCache:
    def __init__(self, clock: Clock, ttl: Callable[[], float], limit_s: float = 2.0) -> None:
        self._clock = clock
        self._ttl = ttl
        self._limit_s = limit_s
        self._results: dict[str, ProbeResult] = {}
        self._inflight: dict[str, asyncio.Task[ProbeResult]] = {}

    def last(self, replica_id: str) -> ProbeResult | None:
        return self._results.get(replica_id)

    def fresh(self, replica_id: str) -> bool:
        result = self._results.get(replica_id)
        return (
            result is not None and result.ok and self._clock.monotonic() - result.at < self._ttl()
        )

    def record_ok(self, replica_id: str) -> None:
        """A replica that just became ready was probed healthy by its readiness wait."""
        self._results[replica_id] = ProbeResult(True, self._clock.monotonic(), self._clock.wall())

    def invalidate(self, replica_id: str) -> None:
        self._results.pop(replica_id, None)

    def forget(self, replica_id: str) -> None:
        self._results.pop(replica_id, None)
        self._inflight.pop(replica_id, None)

    async def check(self, replica: Probeable, *, force: bool = False) -> ProbeResult:
        if not force and self.fresh(replica.id):
            return self._results[replica.id]
        task = self._inflight.get(replica.id)
        if task is None:
            task = asyncio.create_task(self._probe(replica), name=f"probe-{replica.id}")
            self._inflight[replica.id] = task
        return await asyncio.shield(task)

    async def _probe(self, replica: Probeable) -> ProbeResult:
        try:
            ok = await replica.probe(self._limit_s)
        finally:
            self._inflight.pop(replica.id, None)
        result = ProbeResult(ok, self._clock.monotonic(), self._clock.wall())
        self._results[replica.id] = result
        return result
