"""Resource readings off the event loop.

NVML calls and /proc reads block; on the event loop they would stall every Route
while they run. The sampler runs each reading in a worker thread, and callers
that ask while a reading is in flight share it instead of starting another.
A reader that says it never blocks (`blocking = False`: in-memory test readers)
is read inline, so tests on a fake clock stay deterministic.
"""

import asyncio
from collections.abc import Callable
from typing import TypeVar

from modeld.capacity.resources import ResourceReader
from modeld.policy.view import HostView

T = TypeVar("T")


class Sampler:
    def __init__(self, reader: ResourceReader) -> None:
        self._reader = reader
        self._inline = getattr(reader, "blocking", True) is False
        self._host: asyncio.Future[HostView] | None = None
        self._processes: asyncio.Future[dict[int, int]] | None = None

    async def host(self) -> HostView:
        if self._inline:
            return self._reader.read()
        if self._host is None or self._host.done():
            self._host = _in_thread(self._reader.read)
        return await asyncio.shield(self._host)

    async def processes(self) -> dict[int, int]:
        if self._inline:
            return self._reader.process_gpu_memory()
        if self._processes is None or self._processes.done():
            self._processes = _in_thread(self._reader.process_gpu_memory)
        return await asyncio.shield(self._processes)


def _in_thread(read: Callable[[], T]) -> "asyncio.Future[T]":
    future = asyncio.ensure_future(asyncio.to_thread(read))
    # A caller that gave up must not leave the error unretrieved.
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future
