"""A replica's ring of output lines, which log followers read from.

A ring numbers its lines; a follower keeps the number of the next line it wants
(a cursor) and reads from the ring itself, so adding lines never touches a
follower.

It also keeps the head of each start (its first `head_lines` lines): a server
that prints thousands of lines once it serves would otherwise push out the
loader's lines, which are the ones that explain a bad model file or an
out-of-memory. Tails (`kept`) show a start's head, a marker line saying how
many lines were dropped, then the newest lines.
"""

from collections.abc import Callable
from typing import NamedTuple, TypeVar

T = TypeVar("T")

MODELD = "modeld"  # the daemon's own notes on a replica's lifecycle


class LogLine(NamedTuple):
    time: float  # wall clock, seconds since the epoch
    replica_id: str
    model: str
    stream: str  # STDOUT, STDERR or MODELD
    text: str


class LogRing:
    """The newest `size` lines of one replica.

    Line n (counting from 0 since the ring was created) sits in slot n % size until
    line n + size takes its place. A line is kept as its text, stream, wall time and
    batch number (store-wide, increasing: the order lines arrived in across rings)
    in four parallel lists, so adding a pipe chunk is a few slice assignments and a
    LogLine is built only for whoever reads it.
    """

    __slots__ = (
        "batches",
        "end",
        "head_end",
        "head_lines",
        "heads",
        "last_output_at",
        "model",
        "probe_line",
        "replica_id",
        "size",
        "stopped",
        "streams",
        "texts",
        "times",
    )

    def __init__(
        self,
        replica_id: str,
        model: str,
        size: int,
        probe_line: Callable[[str], bool] | None = None,
        head_lines: int = 0,
    ) -> None:
        self.replica_id = replica_id
        self.head_lines = head_lines
        # The heads of the starts so far: (line number, batch, line), oldest first.
        self.heads: list[tuple[int, int, LogLine]] = []
        self.head_end = 0  # lines numbered below this belong to the current start's head
        # Lines the daemon's own health probes caused: output, but not progress.
        self.probe_line = probe_line
        self.model = model
        self.size = size
        self.end = 0  # the number of the next line
        self.texts: list[str] = []
        self.streams: list[str] = []
        self.times: list[float] = []
        self.batches: list[int] = []
        self.last_output_at: float | None = None
        self.stopped = False

    @property
    def start(self) -> int:
        """The number of the oldest line kept."""
        return max(0, self.end - self.size)

    def begin_start(self) -> None:
        """A new process of the replica starts: its first lines are its head."""
        self.head_end = self.end + self.head_lines

    def extend(self, batch: int, now: float, stream: str, texts: list[str]) -> None:
        if self.end < self.head_end:
            first, rid, model = self.end, self.replica_id, self.model
            self.heads += [
                (first + i, batch, LogLine(now, rid, model, stream, text))
                for i, text in enumerate(texts[: self.head_end - self.end])
            ]
        room = self.size - len(self.texts)
        if room > 0:  # still filling: line n is at index n
            head = texts if len(texts) <= room else texts[:room]
            self._write(len(self.texts), batch, now, stream, head)
            self.end += len(head)
            texts = texts[len(head) :]
        if len(texts) > self.size:
            self.end += len(texts) - self.size
            texts = texts[-self.size :]
        while texts:
            pos = self.end % self.size
            part = texts[: self.size - pos]
            self._write(pos, batch, now, stream, part)
            self.end += len(part)
            texts = texts[len(part) :]

    def _write(self, pos: int, batch: int, now: float, stream: str, texts: list[str]) -> None:
        n = len(texts)
        self.texts[pos : pos + n] = texts
        self.streams[pos : pos + n] = [stream] * n
        self.times[pos : pos + n] = [now] * n
        self.batches[pos : pos + n] = [batch] * n

    def read(self, first: int, last: int) -> list[LogLine]:
        """Lines `first`..`last`-1, which must still be kept."""
        rid, model = self.replica_id, self.model
        return [
            LogLine(time, rid, model, stream, text)
            for time, stream, text in zip(
                self._span(self.times, first, last),
                self._span(self.streams, first, last),
                self._span(self.texts, first, last),
                strict=True,
            )
        ]

    def kept(self, n: int) -> list[tuple[int, LogLine]]:
        """The newest `n` lines as (batch, line), oldest first; when `n` reaches past the
        oldest line the ring holds, the heads that fell out of it come first, with a
        marker line wherever lines were dropped."""
        first = max(self.start, self.end - n)
        lines = self.read(first, self.end)
        newest = list(zip(self.batches_of(first, self.end), lines, strict=True))
        if first > self.start or not self.heads or self.heads[0][0] >= self.start:
            return newest
        out: list[tuple[int, LogLine]] = []
        expected = 0
        for number, batch, line in self.heads:
            if number >= self.start:
                break
            if number > expected:
                out.append((batch, self._dropped(number - expected, line.time)))
            out.append((batch, line))
            expected = number + 1
        if newest and self.start > expected:
            out.append((newest[0][0], self._dropped(self.start - expected, newest[0][1].time)))
        out += newest
        return out[-n:]

    def _dropped(self, count: int, time: float) -> LogLine:
        return LogLine(time, self.replica_id, self.model, MODELD, f"[modeld] {count} lines dropped")

    def batches_of(self, first: int, last: int) -> list[int]:
        return self._span(self.batches, first, last)

    def _span(self, slots: list[T], first: int, last: int) -> list[T]:
        i = first % self.size
        j = i + last - first
        if j <= self.size:
            return slots[i:j]
        return slots[i:] + slots[: j - self.size]
