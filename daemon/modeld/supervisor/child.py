"""One spawned backend process, its process group and its box, as a replica holds it.

A replica may spawn more than one (a start retries on a fresh port when the
last one was taken); each is a `Child`. The replica decides what to do; a Child
only knows how to signal, await and clean up its own processes: the group it
leads while it runs, and every descendant through the replica's box (cgroup or
marker, see containment.py), which also holds those that left the group.
"""

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from modeld.supervisor.backend_client import host_port
from modeld.supervisor.containment import Box
from modeld.supervisor.process import BackendProcess, kill_group

PIPE_DRAIN_S = 0.5
KILL_WAIT_S = 5.0


@dataclass(eq=False)
class Child:
    proc: BackendProcess
    host: str
    port: int
    spawned_at: float  # monotonic
    spawned_wall: float
    proc_start: int | None  # /proc start time: with the pid, names this very process
    box: Box  # every descendant, wherever it went
    # Set by the exit watch once the process is reaped and its pipes are read out.
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    exit_code: int | None = None
    pumps: list["asyncio.Task[None]"] = field(default_factory=list)
    watch: "asyncio.Task[None] | None" = None
    # Told every pid the box ever held once it is empty (GPU memory release tracking).
    on_gone: Callable[[list[int]], None] | None = None
    # Signals to the box in flight: listing it may scan /proc, which is kept off the loop.
    signalling: list["asyncio.Future[None]"] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def pgid(self) -> int:
        # The spawner starts every backend in a session of its own, which it leads.
        return self.proc.pid

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    def signal_group(self, sig: int) -> None:
        """Signal the group now, and every other process in the box from a thread.

        The waits below first see those signals sent.
        """
        # The group id is surely ours while its leader is unreaped; after that every
        # member that is left is in the box.
        group = None
        if self.proc.returncode is None:
            kill_group(self.pgid, sig)
            group = self.pgid
        sent = asyncio.ensure_future(asyncio.to_thread(self.box.signal, sig, except_group=group))
        self.signalling.append(sent)

    async def _signals_sent(self) -> None:
        pending, self.signalling = self.signalling, []
        for sent in pending:
            await sent

    async def wait_exited(self, limit_s: float) -> bool:
        return await wait_event(self.exited, limit_s)

    async def wait_group_exit(self, limit_s: float) -> bool:
        """True once the leader and every other process in the box have exited."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        if not await self.wait_exited(limit_s):
            return False
        await self._signals_sent()
        return not await self.box.wait_empty(max(0.0, deadline - loop.time()))

    async def reap_group(self) -> list[int]:
        """After the leader exited: nothing in the box may live on. Returns survivors.

        Whatever is left has had its chance (the leader's stop grace, or a crash):
        it gets SIGKILL at once, and the box is empty before this returns.
        """
        await self._signals_sent()
        survivors = await self.box.wait_empty(0)
        if survivors:
            await asyncio.to_thread(self.box.signal, signal.SIGKILL)
            survivors = await self.box.wait_empty(KILL_WAIT_S)
        if not self.exited.is_set():
            survivors = [self.pid, *survivors]
        if not survivors:
            self.box.close()
            if self.on_gone is not None:
                self.on_gone(sorted(self.box.seen | {self.pid}))
        # Pipes still open now are held by a process outside the box; stop reading.
        await wait_tasks(self.pumps, PIPE_DRAIN_S)
        discard(self.pumps)
        return survivors


def describe_exit(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = str(-code)
    return f"killed by signal {name}"


async def wait_event(event: asyncio.Event, limit_s: float) -> bool:
    """True once `event` is set, False if `limit_s` passes first."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(limit_s):
            await event.wait()
    return event.is_set()


async def wait_tasks(tasks: Iterable["asyncio.Future[Any]"], limit_s: float) -> None:
    pending = [t for t in tasks if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=limit_s)


def discard(futures: Iterable["asyncio.Future[Any]"]) -> None:
    """Cancel what is still running; mark the errors of finished ones as seen."""
    for fut in futures:
        if not fut.done():
            fut.cancel()
        elif not fut.cancelled():
            fut.exception()
