"""Resource readings off the event loop.

NVML calls and /proc reads block; on the event loop they would stall every Route
while they run. The sampler runs each reading in a worker thread, and callers
that ask while a reading is in flight share it instead of starting another.
A reader that says it never blocks (`blocking = False`: in-memory test readers)
is read inline, so tests on a fake clock stay deterministic.

A process reading carries the time its read began: a reading begun while a
replica was still loading is a mid-load figure even when it arrives after READY.
"""

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from modeld.capacity.resources import ResourceReader
from modeld.clock import Clock
from modeld.policy.view import HostView

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ProcessReading:
    """GPU memory per pid, and when the read began (monotonic)."""

    by_pid: Mapping[int, int]
    taken_at: float


NO_READING = ProcessReading({}, float("-inf"))


class Sampler:
    def __init__(self, reader: ResourceReader, clock: Clock) -> None:
        self._reader = reader
        self._clock = clock
        self._inline = getattr(reader, "blocking", True) is False
        self._host: asyncio.Future[HostView] | None = None
        self._processes: asyncio.Future[ProcessReading] | None = None

    async def host(self) -> HostView:
        if self._inline:
            return self._reader.read()
        if self._host is None or self._host.done():
            self._host = _in_thread(self._reader.read)
        return await asyncio.shield(self._host)

    async def processes(self) -> ProcessReading:
        if self._inline:
            return ProcessReading(self._reader.process_gpu_memory(), self._clock.monotonic())
        if self._processes is None or self._processes.done():
            # Stamped now, on the loop, before the read can begin in its thread.
            taken_at = self._clock.monotonic()
            self._processes = _in_thread(
                lambda: ProcessReading(self._reader.process_gpu_memory(), taken_at)
            )
        return await asyncio.shield(self._processes)


def _in_thread(read: Callable[[], T]) -> "asyncio.Future[T]":
    future = asyncio.ensure_future(asyncio.to_thread(read))
    # A caller that gave up must not leave the error unretrieved.
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future
