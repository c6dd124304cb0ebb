"""Backend output: a bounded ring of lines per replica, and followers that read it.

A backend may print as fast as it can; neither the ring nor a slow follower may
ever make the reader of its pipe wait, and adding lines costs the same whatever
the number of followers. A follower holds a cursor per ring it follows and is
woken, not pushed to; one that falls more than its lag behind a ring's newest
line loses the oldest of them, and is told how many by one marker line before it
goes on from the oldest line it may still read.
"""

import asyncio
import codecs
import heapq
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from operator import itemgetter
from types import TracebackType
from typing import Self

import structlog

from modeld.clock import Clock
from modeld.errors import InvalidArgument
from modeld.ops.logring import MODELD, LogLine, LogRing
from modeld.ops.wakeups import Wakeups

__all__ = ["CONTINUED", "MODELD", "STDERR", "STDOUT", "LogLine", "LogStore", "LogSubscription"]

log = structlog.get_logger(__name__)

STDOUT = "stdout"
STDERR = "stderr"

CONTINUED = "[…continued] "
# Work per loop turn for each pipe: one chunk is split and stored in ~0.1 ms (short
# lines), so a backend writing without pause delays RPCs on the same loop by that
# much per turn at most.
READ_CHUNK = 8 * 1024
MIN_MAX_LINE = 64
# Lines a follower takes from a ring at a time: what one that stalls while sending
# them keeps alive after the ring has moved on.
FOLLOW_BATCH = 64
ALL: Hashable = ("all",)


class _LineSplitter:
    """Turns a pipe's bytes into text lines of at most `max_line` characters.

    Over-long lines are cut into pieces; every piece after the first starts with
    CONTINUED (counted in the limit). Decoding is incremental so a character split
    across two reads survives; invalid UTF-8 becomes U+FFFD.
    """

    def __init__(self, max_line: int) -> None:
        if max_line < MIN_MAX_LINE:
            raise ValueError(f"max_line must be at least {MIN_MAX_LINE}, got {max_line}")
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._max = max_line
        self._partial = ""
        self._continued = False

    @property
    def partial(self) -> str:
        """The line read so far whose end has not come yet."""
        return self._partial

    def feed(self, data: bytes) -> list[str]:
        return self.split(self._decoder.decode(data), final=False)

    def finish(self) -> list[str]:
        return self.split(self._decoder.decode(b"", final=True), final=True)

    def split(self, text: str, *, final: bool) -> list[str]:
        joined = self._partial + text
        lines = joined.split("\n")
        partial = lines.pop()
        out: list[str]
        if self._continued or (lines and self._longest(text, lines) > self._max):
            out = []
            for line in lines:
                self._emit(self._cut(line.removesuffix("\r"), out), out)
        else:  # the common case, with no line to cut, at C speed
            out = [line.removesuffix("\r") for line in lines] if "\r" in joined else lines
        partial = self._cut(partial, out)
        if final and partial:
            self._emit(partial, out)
            partial = ""
        self._partial = partial
        return out

    def _longest(self, text: str, lines: list[str]) -> int:
        """The length of the longest line, or a bound on it: only the first line can
        be longer than the text just read (it may continue the partial line)."""
        if len(text) <= self._max:
            return max(len(lines[0]), len(text))
        return max(map(len, lines))

    def _cut(self, text: str, out: list[str]) -> str:
        """Emits full pieces of `text` while it is too long; returns the rest."""
        start = 0
        room = self._room()
        while len(text) - start > room:
            piece = text[start : start + room]
            out.append(CONTINUED + piece if self._continued else piece)
            start += room
            self._continued = True
            room = self._room()
        return text[start:] if start else text

    def _emit(self, text: str, out: list[str]) -> None:
        out.append(CONTINUED + text if self._continued else text)
        self._continued = False

    def _room(self) -> int:
        return self._max - len(CONTINUED) if self._continued else self._max


class LogSubscription:
    """Live lines for one consumer task. Iterate it; close() (or `with`) ends it.

    It keeps a cursor per ring it follows (rings of its model or of every replica
    opened later are found as they appear) and reads the rings when it is asked
    for a line; the store keeps no reference to it except while it waits. A
    replica subscription ends, once drained, when that replica is closed.
    """

    def __init__(
        self,
        store: "LogStore",
        *,
        model: str | None,
        replica_id: str | None,
        lag: int,
    ) -> None:
        self._store = store
        self.model = model
        self.replica_id = replica_id
        self._lag = lag
        self._key = store.key_of(model, replica_id)
        self._cursors: dict[LogRing, int] = {ring: ring.end for ring in store.rings_for(self)}
        self._generation = store.generation
        self._taken: deque[LogLine] = deque()
        self._lost = 0  # lines already announced by a marker
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    @property
    def dropped(self) -> int:
        """Lines this subscriber lost, in total, because it read too slowly."""
        return self._lost + sum(
            self._behind(ring, cursor) for ring, cursor in self._cursors.items()
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._store.report_dropped(self.dropped - self._lost)
        self._cursors.clear()
        self._taken.clear()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> LogLine:
        while not self._closed:
            if self._taken:
                return self._taken.popleft()
            if (marker := self._take()) is not None:
                return marker
            if self._taken:
                continue
            if self._ended():
                break
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._store.wakeups.wait(self._key, self._waiter)
            finally:
                self._waiter = None
        raise StopAsyncIteration

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _behind(self, ring: LogRing, cursor: int) -> int:
        """Lines of `ring` this follower lost: more than its lag behind the newest."""
        return max(0, ring.end - self._lag - cursor)

    def _take(self) -> LogLine | None:
        """Moves the next lines into `_taken`, in the order they arrived across rings;
        returns the marker that must come before them when lines were lost."""
        if self._generation != self._store.generation:
            self._find_rings()
        marker = self._skip_lost()
        spans = [
            (ring, cursor, min(ring.end, cursor + FOLLOW_BATCH))
            for ring, cursor in self._cursors.items()
            if ring.end > cursor
        ]
        if len(spans) == 1:
            ring, first, last = spans[0]
            self._taken.extend(ring.read(first, last))
            self._cursors[ring] = last
        elif spans:
            self._take_merged(spans)
        return marker

    def _take_merged(self, spans: list[tuple[LogRing, int, int]]) -> None:
        """Lines of several rings, merged by batch number, up to the last batch that
        every ring with more to read has been read up to (so none comes out of order)."""
        cutoff = min(
            (ring.batches_of(last - 1, last)[0] for ring, _, last in spans if last < ring.end),
            default=None,
        )
        parts = []
        for ring, first, end in spans:
            batches = ring.batches_of(first, end)
            last = end if cutoff is None else first + bisect_right(batches, cutoff)
            if last > first:
                parts.append(zip(batches, ring.read(first, last), strict=False))
                self._cursors[ring] = last
        self._taken.extend(line for _, line in heapq.merge(*parts, key=itemgetter(0)))

    def _skip_lost(self) -> LogLine | None:
        lost, where = 0, None
        for ring, cursor in self._cursors.items():
            if behind := self._behind(ring, cursor):
                self._cursors[ring] = cursor + behind
                lost, where = lost + behind, ring
        if where is None:
            return None
        self._lost += lost
        self._store.report_dropped(lost)
        return LogLine(
            self._store.clock.wall(),
            where.replica_id,
            where.model,
            MODELD,
            f"[modeld] {lost} lines dropped: subscriber too slow",
        )

    def _find_rings(self) -> None:
        """Rings opened since it last looked start at their first line; rings the store
        has forgotten are forgotten here too once read to the end."""
        self._generation = self._store.generation
        current = set(self._store.rings_for(self))
        for ring in current:
            self._cursors.setdefault(ring, 0)
        gone = [r for r, c in self._cursors.items() if c >= r.end and r not in current]
        for ring in gone:
            del self._cursors[ring]

    def _ended(self) -> bool:
        if self._store.closing:
            return True
        if self.replica_id is None:
            return False
        return any(ring.stopped for ring in self._cursors)


def _progress(ring: LogRing, texts: list[str], partial: str) -> bool:
    """Whether output is progress: any line but those the daemon's probes caused. A
    chunk that ends no line (a loader printing dots) is progress unless the line so
    far is a probe's: servers print an access line in more than one write."""
    probe_line = ring.probe_line
    if probe_line is None:
        return True
    if texts:
        return not all(map(probe_line, texts))
    return not partial or not probe_line(partial)


def _one_target(model: str | None, replica_id: str | None) -> None:
    if model is not None and replica_id is not None:
        raise InvalidArgument("give a model or a replica id, not both")


class LogStore:
    """The only owner of backend output. Every method runs on the event loop thread."""

    def __init__(
        self,
        clock: Clock,
        *,
        ring_lines: int = 1000,
        head_lines: int = 0,
        keep_stopped: int = 5,
        subscriber_queue: int = 1000,
        max_line: int = 8192,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        if ring_lines < 1 or keep_stopped < 0 or subscriber_queue < 1:
            raise ValueError("ring_lines and subscriber_queue must be >= 1, keep_stopped >= 0")
        _LineSplitter(max_line)  # validates max_line now rather than at the first long line
        self.clock = clock
        # Told how many lines followers lost, once per drop marker (not per line).
        self._on_dropped = on_dropped
        self._ring_lines = ring_lines
        self._head_lines = head_lines
        self._keep_stopped = keep_stopped
        # How far a follower may fall behind a ring's newest line; the ring bounds it too.
        self._lag = min(subscriber_queue, ring_lines)
        self._max_line = max_line
        self._rings: dict[str, LogRing] = {}
        # Replica ids per model in the order they were opened (a dict as an ordered set).
        self._models: dict[str, dict[str, None]] = {}
        self._stopped: dict[str, deque[str]] = {}
        self._batch = 0
        # Changes whenever a ring is created or forgotten, so followers of a model or
        # of everything look for rings only then.
        self.generation = 0
        self.wakeups = Wakeups()
        self.closing = False

    def open(
        self, replica_id: str, model: str, *, probe_line: Callable[[str], bool] | None = None
    ) -> None:
        """Creates the ring of a new replica; reopening a known id keeps its lines. Either
        way a start begins: its first lines are kept as its head. `probe_line` tells
        lines the daemon's probes caused, which are no progress."""
        ring = self._rings.get(replica_id)
        if ring is None:
            ring = LogRing(replica_id, model, self._ring_lines, probe_line, self._head_lines)
            self._rings[replica_id] = ring
            self._models.setdefault(model, {})[replica_id] = None
            self.generation += 1
        elif ring.model != model:
            raise ValueError(f"replica {replica_id} belongs to model {ring.model}, not {model}")
        elif ring.stopped:
            ring.stopped = False
            self._stopped[model].remove(replica_id)
        ring.begin_start()

    def append(self, replica_id: str, stream: str, text: str) -> None:
        """Adds one decoded line; lines for a replica the store does not know are ignored."""
        if len(text) > self._max_line or "\n" in text:
            self._add(replica_id, stream, _LineSplitter(self._max_line).split(text, final=True))
        else:
            self._add(replica_id, stream, [text])

    def note(self, replica_id: str, text: str) -> None:
        self.append(replica_id, MODELD, text)

    async def pump(
        self,
        replica_id: str,
        stream: str,
        reader: asyncio.StreamReader,
        *,
        max_line: int | None = None,
    ) -> None:
        """Copies a child's pipe into the ring until EOF; bad bytes never make it raise."""
        splitter = _LineSplitter(max_line or self._max_line)
        try:
            while chunk := await reader.read(READ_CHUNK):
                self._add(replica_id, stream, splitter.feed(chunk), splitter.partial)
                # read() returns without suspending while data is buffered; a flooding
                # backend must not starve the RPCs served by the same loop.
                await asyncio.sleep(0)
        except OSError as exc:
            log.warning(
                "log_pump_read_failed", replica_id=replica_id, stream=stream, error=str(exc)
            )
        finally:
            self._add(replica_id, stream, splitter.finish())

    def last_output_at(self, replica_id: str) -> float | None:
        """Monotonic time the replica's pipes last delivered output other than lines its
        probes caused (readiness progress)."""
        ring = self._rings.get(replica_id)
        return ring.last_output_at if ring else None

    def tail_lines(self, replica_id: str, n: int) -> list[LogLine]:
        """The newest `n` lines of one replica, oldest first (its starts' heads first,
        when `n` reaches past the ring)."""
        ring = self._rings.get(replica_id)
        if ring is None or n <= 0:
            return []
        return [line for _, line in ring.kept(n)]

    def lines_since(self, replica_id: str, since: float) -> list[LogLine]:
        """Every line kept of one replica that arrived at or after wall time `since`."""
        ring = self._rings.get(replica_id)
        if ring is None:
            return []
        return [line for _, line in ring.kept(ring.end) if line.time >= since]

    def is_probe_line(self, replica_id: str, text: str) -> bool:
        ring = self._rings.get(replica_id)
        return ring is not None and ring.probe_line is not None and ring.probe_line(text)

    def close(self, replica_id: str) -> None:
        """The replica stopped: keep its ring among the model's last `keep_stopped`."""
        ring = self._rings.get(replica_id)
        if ring is None or ring.stopped:
            return
        ring.stopped = True
        self.wakeups.wake(self.key_of(None, replica_id))
        stopped = self._stopped.setdefault(ring.model, deque())
        stopped.append(replica_id)
        while len(stopped) > self._keep_stopped:
            self._drop(stopped.popleft())

    def knows_model(self, model: str) -> bool:
        return model in self._models

    def knows_replica(self, replica_id: str) -> bool:
        return replica_id in self._rings

    def tail(
        self, *, model: str | None = None, replica_id: str | None = None, n: int
    ) -> list[LogLine]:
        """The newest `n` lines of a replica, a model's replicas, or (neither) all, in
        the order they arrived."""
        _one_target(model, replica_id)
        if replica_id is not None:
            return self.tail_lines(replica_id, n)
        if n <= 0:
            return []
        ids: Iterable[str] = self._models.get(model, {}) if model is not None else self._rings
        newest = [ring.kept(n) for ring in (self._rings[rid] for rid in ids)]
        merged = heapq.merge(*newest, key=itemgetter(0))
        return [line for _, line in merged][-n:]

    def subscribe(
        self, *, model: str | None = None, replica_id: str | None = None
    ) -> LogSubscription:
        """Live lines of one replica, of every replica of a model (also ones opened
        later), or, with neither given, of every replica."""
        _one_target(model, replica_id)
        return LogSubscription(self, model=model, replica_id=replica_id, lag=self._lag)

    def rings_for(self, sub: LogSubscription) -> list[LogRing]:
        """The rings a subscription follows now."""
        if sub.replica_id is not None:
            ring = self._rings.get(sub.replica_id)
            return [] if ring is None else [ring]
        if sub.model is not None:
            return [self._rings[rid] for rid in self._models.get(sub.model, ())]
        return list(self._rings.values())

    @staticmethod
    def key_of(model: str | None, replica_id: str | None) -> Hashable:
        """What followers of a replica, a model or everything wait on."""
        if replica_id is not None:
            return ("replica", replica_id)
        return ALL if model is None else ("model", model)

    def report_dropped(self, lines: int) -> None:
        if self._on_dropped is not None and lines:
            self._on_dropped(lines)

    def close_all(self) -> None:
        """The daemon is stopping: every follower ends once it has read what it has."""
        self.closing = True
        self.wakeups.wake_all()

    def _add(self, replica_id: str, stream: str, texts: list[str], partial: str = "") -> None:
        ring = self._rings.get(replica_id)
        if ring is None:
            return
        if stream != MODELD and _progress(ring, texts, partial):
            ring.last_output_at = self.clock.monotonic()
        if not texts:
            return
        self._batch += 1
        ring.extend(self._batch, self.clock.wall(), stream, texts)
        # Three wake-ups whatever the number of followers: only those waiting now are
        # resolved, and each then reads the ring itself.
        self.wakeups.wake(("replica", replica_id))
        self.wakeups.wake(("model", ring.model))
        self.wakeups.wake(ALL)

    def _drop(self, replica_id: str) -> None:
        ring = self._rings.pop(replica_id)
        replicas = self._models[ring.model]
        del replicas[replica_id]
        if not replicas:
            del self._models[ring.model]
            del self._stopped[ring.model]
        self.generation += 1
        log.debug("log_ring_dropped", replica_id=replica_id, model=ring.model)
