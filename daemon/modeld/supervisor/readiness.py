"""The waits of one start: every one races the process exit, a stop request and a deadline.

The deadline is `ready_timeout` after the backend's newest sign of progress,
and never later than `ready_ceiling` after the start began. Progress is a line
of the backend's own output (a backend that keeps printing is making progress)
or a health answer of "loading" (HTTP 503); a line its probes cause (an access
line naming the health path) is neither progress nor a reason to probe sooner,
or a server that logs every request would keep itself waiting forever. Health
is probed with a fresh short-deadline call, first after 5 ms, backing off to
250 ms between probes, and sooner (never within 20 ms of the last probe) when
the backend prints something (often: "listening"). A health path the server
says it does not have fails the start at once.
"""

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

from modeld.clock import Clock
from modeld.ops.logstore import MODELD, LogLine, LogStore, LogSubscription
from modeld.spec import BackendSpec
from modeld.supervisor.backend_client import Answer, Verdict
from modeld.supervisor.child import Child, describe_exit, discard

T = TypeVar("T")

PROBE_FIRST_S = 0.005
PROBE_BACKOFF = 1.5
PROBE_CAP_S = 0.25
PROBE_LIMIT_S = 0.5
# New output cuts the wait before the next probe short, but not below this gap,
# so a chatty backend is not probed in a tight loop.
PROBE_OUTPUT_GAP_S = 0.02


LineFilter = Callable[[str], bool]


class StartFailed(Exception):
    """A start gave up; `phase` is spawn, ready or load. `misconfigured`: retrying the
    same configuration cannot succeed (the health path is wrong)."""

    def __init__(
        self, phase: str, detail: str, exit_code: int | None = None, *, misconfigured: bool = False
    ) -> None:
        super().__init__(f"{phase}: {detail}")
        self.phase = phase
        self.detail = detail
        self.exit_code = exit_code
        self.misconfigured = misconfigured


def probe_lines(backend: BackendSpec) -> LineFilter | None:
    """Whether a line of output is one the daemon's own health probes caused: an HTTP
    server's access line naming the health path. gRPC probes print nothing."""
    if backend.protocol != "http":
        return None
    path = re.compile(r"(?<![\w/.-])" + re.escape(backend.health_path) + r"(?=[\s\"'?]|$)")
    return lambda text: path.search(text) is not None


class StopRequested(Exception):
    """The replica is being stopped; the start stops waiting and leaves the rest to stop()."""


class StartRace:
    def __init__(
        self,
        *,
        clock: Clock,
        logs: LogStore,
        replica_id: str,
        backend: BackendSpec,
        stop_requested: asyncio.Event,
    ) -> None:
        self._clock = clock
        self._logs = logs
        self._replica_id = replica_id
        self._backend = backend
        self._stop_requested = stop_requested
        self._probe_line = probe_lines(backend)
        self.began = clock.monotonic()
        self._loading_at: float | None = None  # the newest "loading" health answer

    def elapsed(self) -> float:
        return self._clock.monotonic() - self.began

    def ceiling_left(self) -> float:
        return self._backend.ready_ceiling - self.elapsed()

    async def run(self, child: Child, work: Awaitable[T], phase: str) -> T:
        """`work`'s result, unless the child exits, a stop is asked for, or time runs out."""
        task = asyncio.ensure_future(work)
        exited = asyncio.ensure_future(child.exited.wait())
        stopping = asyncio.ensure_future(self._stop_requested.wait())
        waits = (task, exited, stopping)
        try:
            while not any(w.done() for w in waits):
                left = self._deadline(child) - self._clock.monotonic()
                if left <= 0:
                    raise StartFailed(phase, self._timeout_detail())
                await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if stopping.done():
                raise StopRequested
            if exited.done():
                raise exit_failure(child, phase)
            return task.result()
        finally:
            discard(waits)

    async def wait_healthy(self, child: Child, probe: Callable[[float], Awaitable[Answer]]) -> None:
        """Probe until healthy, backing off, and sooner when the backend prints something."""
        delay = PROBE_FIRST_S
        with self._logs.subscribe(replica_id=self._replica_id) as output:
            while not self._judge(await self.run(child, probe(PROBE_LIMIT_S), "ready")):
                await self.run(child, self._pause(output, delay), "ready")
                delay = min(delay * PROBE_BACKOFF, PROBE_CAP_S)

    def _judge(self, answer: Answer) -> bool:
        """Ready or not; a loading answer is progress, a wrong health path is the end."""
        if answer.verdict is Verdict.WRONG_PATH:
            raise StartFailed(
                "ready",
                f"{answer.detail}: the health path is wrong "
                f"(set backends.{self._backend.name}.health_path to a path this server "
                "answers with 200 when it is ready)",
                misconfigured=True,
            )
        if answer.verdict is Verdict.LOADING:
            self._loading_at = self._clock.monotonic()
        return answer.ok

    def _deadline(self, child: Child) -> float:
        since = child.spawned_at
        for mark in (self._logs.last_output_at(self._replica_id), self._loading_at):
            if mark is not None:
                since = max(since, mark)
        return min(since + self._backend.ready_timeout, self.began + self._backend.ready_ceiling)

    def _progress(self, line: LogLine) -> bool:
        if line.stream == MODELD:
            return False
        return self._probe_line is None or not self._probe_line(line.text)

    async def _pause(self, output: LogSubscription, delay: float) -> None:
        """`delay`, cut short by the backend's own output (but not below the output gap)."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                try:
                    while not self._progress(await anext(output)):
                        pass
                except StopAsyncIteration:
                    # The output ended (the log store closes first at shutdown): no line
                    # will cut this pause short, and returning now would probe in a loop.
                    await asyncio.sleep(delay)
                await asyncio.sleep(max(0.0, began + PROBE_OUTPUT_GAP_S - loop.time()))

    def _timeout_detail(self) -> str:
        waited = self.elapsed()
        if waited >= self._backend.ready_ceiling:
            return f"not ready after {waited:.1f}s (ready_ceiling {self._backend.ready_ceiling}s)"
        return (
            f"no progress for ready_timeout {self._backend.ready_timeout}s: "
            "no new output (lines its health probes caused do not count) and not ready "
            f"(waited {waited:.1f}s in all)"
        )


def exit_failure(child: Child, phase: str) -> StartFailed:
    code = child.exit_code if child.exit_code is not None else child.proc.returncode
    what = describe_exit(code) if code is not None else "exited"
    return StartFailed(phase, f"the backend {what} before it was ready", code)
