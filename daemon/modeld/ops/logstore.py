"""Backend output: a bounded ring of lines per replica, and live subscribers.

A backend may print as fast as it can; neither the ring nor a slow subscriber
may ever make the reader of its pipe wait. Each subscriber has a bounded queue;
lines that do not fit are counted, and the subscriber is told how many it lost
by one marker line in place of them.
"""

import asyncio
import codecs
import heapq
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from operator import attrgetter
from types import TracebackType
from typing import Self

import structlog

from modeld.clock import Clock
from modeld.errors import InvalidArgument

log = structlog.get_logger(__name__)

STDOUT = "stdout"
STDERR = "stderr"
MODELD = "modeld"  # the daemon's own notes on a replica's lifecycle

CONTINUED = "[…continued] "
# Small enough that one chunk of short lines is a few ms of work, so a backend
# flooding its output cannot hold the event loop away from RPCs for long.
READ_CHUNK = 16 * 1024
MIN_MAX_LINE = 64


@dataclass(frozen=True, slots=True)
class LogLine:
    time: float  # wall clock, seconds since the epoch
    replica_id: str
    model: str
    stream: str  # STDOUT, STDERR or MODELD
    text: str


_by_time = attrgetter("time")


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

    def feed(self, data: bytes) -> list[str]:
        return self.split(self._decoder.decode(data), final=False)

    def finish(self) -> list[str]:
        return self.split(self._decoder.decode(b"", final=True), final=True)

    def split(self, text: str, *, final: bool) -> list[str]:
        out: list[str] = []
        lines = (self._partial + text).split("\n")
        partial = lines.pop()
        for line in lines:
            self._emit(self._cut(line.removesuffix("\r"), out), out)
        partial = self._cut(partial, out)
        if final and partial:
            self._emit(partial, out)
            partial = ""
        self._partial = partial
        return out

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


class _Ring:
    __slots__ = ("last_output_at", "lines", "model", "stopped")

    def __init__(self, model: str, size: int) -> None:
        self.model = model
        self.lines: deque[LogLine] = deque(maxlen=size)
        self.last_output_at: float | None = None
        self.stopped = False


class LogSubscription:
    """Live lines for one consumer task. Iterate it; close() (or `with`) ends it.

    A replica subscription also ends, once drained, when that replica is closed.
    """

    def __init__(
        self,
        store: "LogStore",
        *,
        model: str | None,
        replica_id: str | None,
        maxsize: int,
    ) -> None:
        self._store = store
        self.model = model
        self.replica_id = replica_id
        self._maxsize = maxsize
        # One slot beyond maxsize leaves room for the marker that precedes a line.
        self._queue: deque[LogLine] = deque(maxlen=maxsize + 1)
        self._dropped = 0
        self._unreported = 0
        self._last_dropped: LogLine | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._finished = False

    @property
    def dropped(self) -> int:
        """Lines this subscriber lost, in total, because it read too slowly."""
        return self._dropped

    def offer_many(self, lines: Sequence[LogLine]) -> None:
        """Queue what fits, in order; count the rest as dropped (never blocks)."""
        room = self._maxsize - len(self._queue)
        if room > 0 and self._unreported:
            self._queue.append(self._marker())
        if room >= len(lines):
            self._queue.extend(lines)
        else:
            taken = max(room, 0)
            self._queue.extend(lines[:taken])
            self._dropped += len(lines) - taken
            self._unreported += len(lines) - taken
            self._last_dropped = lines[-1]
        if room > 0:
            self._wake()

    def finish(self) -> None:
        """No more lines will come: iteration ends once the queue is drained."""
        self._finished = True
        self._wake()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._unreported:
            self._store.report_dropped(self._unreported)
            self._unreported = 0
        self._queue.clear()
        self._store.unsubscribe(self)
        self._wake()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> LogLine:
        while not self._closed:
            if self._queue:
                return self._queue.popleft()
            if self._unreported:
                return self._marker()
            if self._finished:
                break
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
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

    def _marker(self) -> LogLine:
        last = self._last_dropped
        count, self._unreported = self._unreported, 0
        self._store.report_dropped(count)
        return LogLine(
            time=self._store.clock.wall(),
            replica_id=last.replica_id if last else self.replica_id or "",
            model=last.model if last else self.model or "",
            stream=MODELD,
            text=f"[modeld] {count} lines dropped: subscriber too slow",
        )

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


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
        self._keep_stopped = keep_stopped
        self._subscriber_queue = subscriber_queue
        self._max_line = max_line
        self._rings: dict[str, _Ring] = {}
        # Replica ids per model in the order they were opened (a dict as an ordered set).
        self._models: dict[str, dict[str, None]] = {}
        self._stopped: dict[str, deque[str]] = {}
        self._by_replica: dict[str, set[LogSubscription]] = {}
        self._by_model: dict[str, set[LogSubscription]] = {}
        self._everything: set[LogSubscription] = set()

    def open(self, replica_id: str, model: str) -> None:
        """Creates the ring of a new replica; reopening a known id keeps its lines."""
        ring = self._rings.get(replica_id)
        if ring is None:
            self._rings[replica_id] = _Ring(model, self._ring_lines)
            self._models.setdefault(model, {})[replica_id] = None
            return
        if ring.model != model:
            raise ValueError(f"replica {replica_id} belongs to model {ring.model}, not {model}")
        if ring.stopped:
            ring.stopped = False
            self._stopped[model].remove(replica_id)

    def append(self, replica_id: str, stream: str, text: str) -> None:
        """Adds one decoded line; lines for a replica the store does not know are ignored."""
        if len(text) > self._max_line or "\n" in text:
            self._add(replica_id, stream, _LineSplitter(self._max_line).split(text, final=True))
        else:
            self._add(replica_id, stream, (text,))

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
                self._add(replica_id, stream, splitter.feed(chunk))
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
        """Monotonic time the replica's pipes last delivered output (readiness progress)."""
        ring = self._rings.get(replica_id)
        return ring.last_output_at if ring else None

    def tail_lines(self, replica_id: str, n: int) -> list[LogLine]:
        """The newest `n` lines of one replica, oldest first."""
        ring = self._rings.get(replica_id)
        if ring is None or n <= 0:
            return []
        return _newest(ring.lines, n)

    def close(self, replica_id: str) -> None:
        """The replica stopped: keep its ring among the model's last `keep_stopped`."""
        ring = self._rings.get(replica_id)
        if ring is None or ring.stopped:
            return
        ring.stopped = True
        for sub in self._by_replica.pop(replica_id, ()):
            sub.finish()
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
        """The newest `n` lines of a replica, a model's replicas, or (neither) all, by time."""
        _one_target(model, replica_id)
        if replica_id is not None:
            return self.tail_lines(replica_id, n)
        if n <= 0:
            return []
        ids: Iterable[str] = self._models.get(model, {}) if model is not None else self._rings
        newest = [_newest(self._rings[rid].lines, n) for rid in ids]
        return list(heapq.merge(*newest, key=_by_time))[-n:]

    def subscribe(
        self, *, model: str | None = None, replica_id: str | None = None
    ) -> LogSubscription:
        """Live lines of one replica, of every replica of a model (also ones opened
        later), or, with neither given, of every replica."""
        _one_target(model, replica_id)
        sub = LogSubscription(
            self, model=model, replica_id=replica_id, maxsize=self._subscriber_queue
        )
        if replica_id is not None:
            ring = self._rings.get(replica_id)
            if ring is not None and ring.stopped:
                sub.finish()
            else:
                self._by_replica.setdefault(replica_id, set()).add(sub)
        elif model is not None:
            self._by_model.setdefault(model, set()).add(sub)
        else:
            self._everything.add(sub)
        return sub

    def report_dropped(self, lines: int) -> None:
        if self._on_dropped is not None and lines:
            self._on_dropped(lines)

    def close_all(self) -> None:
        """The daemon is stopping: every follower ends once it has drained its queue."""
        subs = [*self._everything, *_members(self._by_model), *_members(self._by_replica)]
        for sub in subs:
            sub.finish()

    def unsubscribe(self, sub: LogSubscription) -> None:
        if sub.replica_id is not None:
            _discard(self._by_replica, sub.replica_id, sub)
        elif sub.model is not None:
            _discard(self._by_model, sub.model, sub)
        else:
            self._everything.discard(sub)

    def _add(self, replica_id: str, stream: str, texts: Iterable[str]) -> None:
        ring = self._rings.get(replica_id)
        if ring is None:
            return
        if stream != MODELD:
            ring.last_output_at = self.clock.monotonic()
        now = self.clock.wall()
        model = ring.model
        targets = [
            *self._by_replica.get(replica_id, ()),
            *self._by_model.get(model, ()),
            *self._everything,
        ]
        lines = [LogLine(now, replica_id, model, stream, text) for text in texts]
        ring.lines.extend(lines)
        # One call per follower per batch (a pipe chunk), not per line: a flood with
        # many followers costs the loop what one line at a time would cost one follower.
        for sub in targets:
            sub.offer_many(lines)

    def _drop(self, replica_id: str) -> None:
        ring = self._rings.pop(replica_id)
        replicas = self._models[ring.model]
        del replicas[replica_id]
        if not replicas:
            del self._models[ring.model]
            del self._stopped[ring.model]
        log.debug("log_ring_dropped", replica_id=replica_id, model=ring.model)


def _newest(lines: deque[LogLine], n: int) -> list[LogLine]:
    newest = list(islice(reversed(lines), n))
    newest.reverse()
    return newest


def _discard(index: dict[str, set[LogSubscription]], key: str, sub: LogSubscription) -> None:
    subs = index.get(key)
    if subs is None:
        return
    subs.discard(sub)
    if not subs:
        del index[key]


def _members(index: dict[str, set[LogSubscription]]) -> list[LogSubscription]:
    return [sub for subs in index.values() for sub in subs]
