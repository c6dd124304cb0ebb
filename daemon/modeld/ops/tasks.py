"""Supervised background tasks: a task that dies is logged with its traceback and
makes the daemon unhealthy, instead of silently stopping (lease expiry, the watchdog,
the observer, load scrapes, and in a cluster its link, membership, leader, specs
and slot loops).

The daemon owns one `TaskSupervisor`; `healthy()` feeds the systemd watchdog and the
gRPC health status, so a dead task means NOT_SERVING and, under systemd, a restart.
"""

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)

# How a component starts a loop that must run as long as the daemon: the daemon
# passes its supervisor's `spawn`; a component built alone (a test) gets `detached`.
Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


def detached(coro: Coroutine[Any, Any, None], name: str) -> "asyncio.Task[None]":
    return asyncio.create_task(coro, name=name)


class TaskSupervisor:
    def __init__(self, on_death: Callable[[str], None] | None = None) -> None:
        self._on_death = on_death
        self._tasks: set[asyncio.Task[None]] = set()
        self._may_end: set[asyncio.Task[None]] = set()
        self.dead: list[str] = []
        self._closing = False

    def spawn(
        self, coro: Coroutine[Any, Any, None], name: str, *, forever: bool = True
    ) -> asyncio.Task[None]:
        """Run `coro`; unless `forever` is False, its returning counts as a death too."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        if not forever:
            self._may_end.add(task)
        task.add_done_callback(self._ended)
        return task

    def healthy(self) -> bool:
        return not self.dead

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        may_end = task in self._may_end
        self._may_end.discard(task)
        if task.cancelled() or self._closing:
            return
        exc = task.exception()
        if exc is None and may_end:
            return
        name = task.get_name()
        if exc is not None:
            log.error("task_died", task=name, exc_info=exc)
        else:
            log.error("task_died", task=name, error="returned although it should run forever")
        self.dead.append(name)
        if self._on_death is not None:
            self._on_death(name)

    def stopping(self) -> None:
        """Shutdown has begun: tasks that end from now on (streams closing) are no deaths."""
        self._closing = True

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
