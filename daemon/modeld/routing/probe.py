"""Cached backend health probes.

A healthy result is reused for `ttl` seconds; a failed one is recorded (so
Health can show it) but never reused: the next check probes again. Concurrent
checks of one replica share a single probe. Forgetting a replica also disowns
its probe in flight, so a result that predates a failure report or a stop is
never recorded.
"""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from modeld.clock import Clock


class Probeable(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def probe_timeout(self) -> float: ...

    async def probe(self, limit_s: float) -> bool: ...


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    at: float  # monotonic
    wall: float


class ProbeCache:
    def __init__(self, clock: Clock, ttl: Callable[[], float]) -> None:
        self._clock = clock
        self._ttl = ttl
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
        """Drop the cached result only: the next check probes (sharing one in flight)."""
        self._results.pop(replica_id, None)

    def forget(self, replica_id: str) -> None:
        """Drop the cached result and disown a probe in flight (the next check starts anew)."""
        self._results.pop(replica_id, None)
        self._inflight.pop(replica_id, None)

    async def check(self, replica: Probeable, *, force: bool = False) -> ProbeResult:
        """A fresh healthy result, else the outcome of a probe (shared with concurrent checks)."""
        if not force and self.fresh(replica.id):
            return self._results[replica.id]
        task = self._inflight.get(replica.id)
        if task is None:
            task = asyncio.create_task(self._probe(replica), name=f"probe-{replica.id}")
            self._inflight[replica.id] = task
            task.add_done_callback(lambda t: self._settled(replica.id, t))
        return await asyncio.shield(task)

    async def _probe(self, replica: Probeable) -> ProbeResult:
        # Each backend's own limit: a busy OpenAI-style server answers health slowly.
        ok = await replica.probe(replica.probe_timeout)
        return ProbeResult(ok, self._clock.monotonic(), self._clock.wall())

    def _settled(self, replica_id: str, task: "asyncio.Task[ProbeResult]") -> None:
        failed = task.cancelled() or task.exception() is not None
        if self._inflight.get(replica_id) is not task:
            return
        del self._inflight[replica_id]
        if not failed:
            self._results[replica_id] = task.result()
