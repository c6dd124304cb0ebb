"""The log store: rings, line splitting, merged tails and subscribers that never block."""

import asyncio
import gc
import sys
import weakref
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modeld.clock import FakeClock
from modeld.errors import InvalidArgument
from modeld.ops.logstore import (
    CONTINUED,
    MODELD,
    STDERR,
    STDOUT,
    LogLine,
    LogStore,
    LogSubscription,
)

DROP_MARKER = "lines dropped: subscriber too slow"


def texts(lines: list[LogLine]) -> list[str]:
    return [line.text for line in lines]


async def pumped(data: list[bytes], *, max_line: int = 8192) -> list[str]:
    store = LogStore(FakeClock(), max_line=max_line)
    store.open("r1", "m")
    reader = asyncio.StreamReader()
    for chunk in data:
        reader.feed_data(chunk)
    reader.feed_eof()
    await store.pump("r1", STDOUT, reader)
    return texts(store.tail_lines("r1", 100))


async def next_line(sub: LogSubscription) -> LogLine:
    async with asyncio.timeout(5):
        return await anext(sub)


def test_ring_keeps_only_the_newest_lines() -> None:
    store = LogStore(FakeClock(), ring_lines=3)
    store.open("r1", "m")
    for i in range(10):
        store.append("r1", STDOUT, f"line {i}")
    assert texts(store.tail_lines("r1", 100)) == ["line 7", "line 8", "line 9"]
    assert texts(store.tail_lines("r1", 2)) == ["line 8", "line 9"]
    assert store.tail_lines("r1", 0) == []


def test_lines_carry_replica_model_stream_and_wall_time() -> None:
    clock = FakeClock()
    store = LogStore(clock)
    store.open("r1", "m")
    store.note("r1", "starting")
    assert store.tail_lines("r1", 1) == [LogLine(clock.wall(), "r1", "m", MODELD, "starting")]


def test_append_to_unknown_replica_is_ignored() -> None:
    store = LogStore(FakeClock())
    store.append("ghost", STDOUT, "boo")
    assert not store.knows_replica("ghost")
    assert store.tail_lines("ghost", 10) == []


async def test_pump_splits_long_lines_with_a_continuation_marker() -> None:
    lines = await pumped([b"a" * 200 + b"\nshort\n"], max_line=64)
    body = [line.removeprefix(CONTINUED) for line in lines[:-1]]
    assert "".join(body) == "a" * 200
    assert all(len(line) <= 64 for line in lines)
    assert not lines[0].startswith(CONTINUED)
    assert all(line.startswith(CONTINUED) for line in lines[1:-1])
    assert lines[-1] == "short"


async def test_pump_splits_a_long_line_that_spans_many_reads() -> None:
    lines = await pumped([b"b" * 50] * 10 + [b"\n"], max_line=64)
    assert "".join(line.removeprefix(CONTINUED) for line in lines) == "b" * 500
    assert all(len(line) <= 64 for line in lines)
    assert sum(not line.startswith(CONTINUED) for line in lines) == 1


async def test_pump_replaces_invalid_utf8() -> None:
    assert await pumped([b"ok \xff\xfe bad\n"]) == ["ok \ufffd\ufffd bad"]


async def test_pump_keeps_a_character_split_across_reads() -> None:
    assert await pumped([b"caf\xc3", b"\xa9\n"]) == ["café"]


async def test_pump_handles_crlf_even_across_reads() -> None:
    assert await pumped([b"one\r\ntwo\r", b"\nthree\n"]) == ["one", "two", "three"]


async def test_pump_flushes_the_last_line_without_newline_at_eof() -> None:
    assert await pumped([b"first\nlast words"]) == ["first", "last words"]


async def test_pump_flushes_a_truncated_character_at_eof() -> None:
    assert await pumped([b"end\xe2\x82"]) == ["end\ufffd"]


class ReadSignallingReader(asyncio.StreamReader):
    """Sets `has_read` each time a read returns data, so a test can wait for the pump."""

    def __init__(self) -> None:
        super().__init__()
        self.has_read = asyncio.Event()

    async def read(self, n: int = -1) -> bytes:
        data = await super().read(n)
        if data:
            self.has_read.set()
        return data


async def test_pump_records_progress_time_even_for_a_partial_line() -> None:
    clock = FakeClock()
    store = LogStore(clock)
    store.open("r1", "m")
    store.note("r1", "spawned")
    assert store.last_output_at("r1") is None
    reader = ReadSignallingReader()
    task = asyncio.create_task(store.pump("r1", STDERR, reader))
    clock.advance(7)
    reader.feed_data(b"loading 10%\r")
    async with asyncio.timeout(5):
        await reader.has_read.wait()
    assert store.last_output_at("r1") == clock.monotonic()
    assert texts(store.tail_lines("r1", 5)) == ["spawned"]
    reader.feed_eof()
    await task
    assert texts(store.tail_lines("r1", 5)) == ["spawned", "loading 10%\r"]


async def test_pump_yields_to_the_event_loop_during_a_flood() -> None:
    store = LogStore(FakeClock())
    store.open("r1", "m")
    reader = asyncio.StreamReader()
    reader.feed_data((b"y" * 1023 + b"\n") * 2048)  # 2 MiB, 32 reads
    reader.feed_eof()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await store.pump("r1", STDOUT, reader)
    task.cancel()
    assert ticks >= 16
    assert len(store.tail_lines("r1", 5000)) == 1000


async def test_pump_reads_a_real_subprocess_pipe() -> None:
    store = LogStore(FakeClock())
    store.open("r1", "m")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys; print('x' * 100000); sys.stdout.write('tail')",
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(20):
        await store.pump("r1", STDOUT, proc.stdout)
        assert await proc.wait() == 0
    lines = texts(store.tail_lines("r1", 100))
    assert lines[-1] == "tail"
    assert "".join(line.removeprefix(CONTINUED) for line in lines[:-1]) == "x" * 100000
    assert all(len(line) <= 8192 for line in lines)


def test_append_splits_embedded_newlines_and_long_text() -> None:
    store = LogStore(FakeClock(), max_line=64)
    store.open("r1", "m")
    store.append("r1", STDERR, "a\r\nb\n")
    store.append("r1", STDERR, "c" * 100)
    assert texts(store.tail_lines("r1", 10)) == ["a", "b", "c" * 64, CONTINUED + "c" * 36]


def test_tail_merges_a_models_replicas_in_time_order() -> None:
    clock = FakeClock()
    store = LogStore(clock)
    store.open("r1", "m")
    store.open("r2", "m")
    store.open("other", "n")
    store.append("r1", STDOUT, "r1 a")
    store.append("r2", STDOUT, "r2 a")  # same time as "r1 a": open order breaks the tie
    clock.advance(1)
    store.append("r2", STDOUT, "r2 b")
    store.append("other", STDOUT, "not m")
    clock.advance(1)
    store.append("r1", STDOUT, "r1 b")
    store.close("r1")
    clock.advance(1)
    store.append("r2", STDERR, "r2 c")
    assert texts(store.tail(model="m", n=10)) == ["r1 a", "r2 a", "r2 b", "r1 b", "r2 c"]
    assert texts(store.tail(model="m", n=2)) == ["r1 b", "r2 c"]
    assert texts(store.tail(replica_id="r1", n=10)) == ["r1 a", "r1 b"]
    assert len(store.tail(n=10)) == 6
    assert store.tail(model="unknown", n=10) == []


def test_tail_and_subscribe_refuse_both_targets() -> None:
    store = LogStore(FakeClock())
    with pytest.raises(InvalidArgument):
        store.tail(model="m", replica_id="r1", n=1)
    with pytest.raises(InvalidArgument):
        store.subscribe(model="m", replica_id="r1")


def test_keep_stopped_drops_the_oldest_stopped_rings() -> None:
    store = LogStore(FakeClock(), keep_stopped=2)
    for i in range(4):
        store.open(f"r{i}", "m")
        store.append(f"r{i}", STDOUT, f"hello from r{i}")
    store.open("x", "other")
    for i in range(3):
        store.close(f"r{i}")
    assert not store.knows_replica("r0")
    assert store.tail_lines("r0", 10) == []
    assert all(store.knows_replica(r) for r in ("r1", "r2", "r3", "x"))
    assert texts(store.tail(model="m", n=10)) == [f"hello from r{i}" for i in (1, 2, 3)]
    store.close("r3")
    assert not store.knows_replica("r1")
    assert store.knows_model("m")
    store.close("x")
    assert store.knows_replica("x")


def test_keep_stopped_zero_forgets_the_model_with_its_last_replica() -> None:
    store = LogStore(FakeClock(), keep_stopped=0)
    store.open("r1", "m")
    store.append("r1", STDOUT, "bye")
    store.close("r1")
    assert not store.knows_replica("r1")
    assert not store.knows_model("m")


def test_reopening_a_stopped_replica_keeps_its_ring() -> None:
    store = LogStore(FakeClock(), keep_stopped=1)
    store.open("r1", "m")
    store.append("r1", STDOUT, "before")
    store.close("r1")
    store.open("r1", "m")
    store.append("r1", STDOUT, "after")
    store.open("r2", "m")
    store.close("r2")
    assert texts(store.tail_lines("r1", 10)) == ["before", "after"]
    with pytest.raises(ValueError, match="belongs to model m"):
        store.open("r1", "n")


async def test_slow_subscriber_never_blocks_append_and_learns_what_it_lost() -> None:
    store = LogStore(FakeClock(), ring_lines=1000, subscriber_queue=100)
    store.open("r1", "m")
    sub = store.subscribe(replica_id="r1")
    for i in range(100_000):
        store.append("r1", STDOUT, str(i))
    assert texts(store.tail_lines("r1", 1000)) == [str(i) for i in range(99_000, 100_000)]
    assert sub.dropped == 99_900
    received = [await next_line(sub) for _ in range(101)]
    assert received[0].stream == MODELD
    assert received[0].text == f"[modeld] 99900 {DROP_MARKER}"
    assert received[0].replica_id == "r1"
    assert texts(received[1:]) == [str(i) for i in range(99_900, 100_000)]
    assert sub.dropped == 99_900
    sub.close()
    assert [line async for line in sub] == []


async def test_drop_marker_comes_before_the_oldest_line_still_kept() -> None:
    store = LogStore(FakeClock(), subscriber_queue=2)
    store.open("r1", "m")
    with store.subscribe(model="m") as sub:
        for text in ("a", "b", "c", "d"):
            store.append("r1", STDOUT, text)
        got = [await next_line(sub) for _ in range(3)]
        assert texts(got) == [f"[modeld] 2 {DROP_MARKER}", "c", "d"]
        store.append("r1", STDOUT, "e")
        assert (await next_line(sub)).text == "e"
        assert sub.dropped == 2


async def test_a_follower_that_stalls_then_resumes_gets_one_marker_then_every_later_line() -> None:
    store = LogStore(FakeClock(), ring_lines=50)
    store.open("r1", "m")
    follower = store.subscribe(replica_id="r1")
    got: asyncio.Queue[LogLine] = asyncio.Queue()
    resume = asyncio.Event()

    async def read() -> None:
        async for line in follower:
            got.put_nowait(line)
            if line.text == "9":
                await resume.wait()  # stalls like a client that stopped reading

    async def received(n: int) -> list[str]:
        async with asyncio.timeout(5):
            return [(await got.get()).text for _ in range(n)]

    reader = asyncio.create_task(read())
    for i in range(10):
        store.append("r1", STDOUT, str(i))
    assert await received(10) == [str(i) for i in range(10)]
    for i in range(10, 1010):  # 1000 lines while it stalls: the ring keeps the last 50
        store.append("r1", STDOUT, str(i))
    resume.set()
    later = await received(51)
    assert later == [f"[modeld] 950 {DROP_MARKER}", *(str(i) for i in range(960, 1010))]
    for text in ("after", "resuming"):
        store.append("r1", STDOUT, text)
        assert await received(1) == [text]
    assert follower.dropped == 950
    assert got.empty()
    reader.cancel()


async def test_a_thousand_followers_of_one_replica_all_receive_a_line() -> None:
    store = LogStore(FakeClock())
    store.open("r1", "m")
    followers = [store.subscribe(replica_id="r1") for _ in range(1000)]
    waiting = [asyncio.create_task(next_line(f)) for f in followers]
    await asyncio.sleep(0)
    assert not any(task.done() for task in waiting)
    store.append("r1", STDOUT, "for everyone")
    received = await asyncio.gather(*waiting)
    assert {line.text for line in received} == {"for everyone"}
    assert len(received) == 1000


async def test_a_follower_that_disconnects_frees_its_cursor() -> None:
    store = LogStore(FakeClock())
    store.open("r1", "m")
    follower = store.subscribe(model="m")
    store.append("r1", STDOUT, "seen")
    gone = weakref.ref(follower)

    async def stream(sub: LogSubscription) -> None:  # what the StreamLogs handler does
        try:
            async for _ in sub:
                pass
        finally:
            sub.close()

    task = asyncio.create_task(stream(follower))
    await asyncio.sleep(0)
    assert store.wakeups.waiting() == 1
    task.cancel()  # gRPC cancels the handler when the client goes away
    await asyncio.wait([task])
    assert task.cancelled()
    del follower, task
    gc.collect()
    assert gone() is None
    assert store.wakeups.waiting() == 0
    store.append("r1", STDOUT, "after")


async def test_a_model_follower_gets_its_replicas_lines_in_the_order_they_came() -> None:
    store = LogStore(FakeClock(), ring_lines=1000)
    store.open("r1", "m")
    store.open("r2", "m")
    follower = store.subscribe(model="m")
    expected = []
    for i in range(300):  # more than a follower takes from a ring at a time
        rid = "r1" if i % 3 else "r2"
        store.append(rid, STDOUT, f"{rid} {i}")
        expected.append(f"{rid} {i}")
        if i % 7 == 0:
            store.append("r1", STDERR, f"a\nb {i}")
            expected += ["a", f"b {i}"]
    got = [await next_line(follower) for _ in range(len(expected))]
    assert texts(got) == expected


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 12),
    batches=st.lists(st.integers(0, 30), max_size=20),
    n=st.integers(0, 15),
)
def test_a_ring_keeps_the_newest_lines_whatever_the_batch_sizes(
    size: int, batches: list[int], n: int
) -> None:
    store = LogStore(FakeClock(), ring_lines=size)
    store.open("r1", "m")
    model: deque[str] = deque(maxlen=size)
    count = 0
    for k in batches:
        lines = [str(count + i) for i in range(k)]
        count += k
        if k:
            store.append("r1", STDOUT, "\n".join(lines))
        model.extend(lines)
    assert texts(store.tail_lines("r1", n)) == (list(model)[-n:] if n else [])
    assert texts(store.tail(model="m", n=size)) == list(model)


async def test_a_slow_subscriber_does_not_affect_another() -> None:
    store = LogStore(FakeClock(), subscriber_queue=10)
    store.open("r1", "m")
    slow = store.subscribe(model="m")
    fast = store.subscribe(replica_id="r1")
    for i in range(30):
        store.append("r1", STDOUT, str(i))
        assert (await next_line(fast)).text == str(i)
    assert fast.dropped == 0
    assert slow.dropped == 20


async def test_model_subscription_sees_replicas_opened_later() -> None:
    store = LogStore(FakeClock())
    store.open("other", "n")
    sub = store.subscribe(model="m")
    store.open("r1", "m")
    store.append("other", STDOUT, "not for m")
    store.append("r1", STDOUT, "hello")
    line = await next_line(sub)
    assert (line.replica_id, line.model, line.text) == ("r1", "m", "hello")


async def test_a_waiting_subscriber_is_woken_by_a_new_line() -> None:
    store = LogStore(FakeClock())
    store.open("r1", "m")
    sub = store.subscribe()
    waiting = asyncio.create_task(next_line(sub))
    await asyncio.sleep(0)
    assert not waiting.done()
    store.append("r1", STDERR, "wake up")
    assert (await waiting).text == "wake up"


async def test_closing_a_subscription_ends_a_waiting_iteration() -> None:
    store = LogStore(FakeClock())
    store.open("r1", "m")
    sub = store.subscribe(model="m")
    collected = asyncio.create_task(asyncio.wait_for(_collect(sub), 5))
    await asyncio.sleep(0)
    sub.close()
    assert await collected == []
    store.append("r1", STDOUT, "after close")
    assert sub.dropped == 0


async def test_replica_subscription_drains_then_ends_when_the_replica_closes() -> None:
    store = LogStore(FakeClock())
    store.open("r1", "m")
    sub = store.subscribe(replica_id="r1")
    store.append("r1", STDOUT, "last")
    store.note("r1", "stopped")
    store.close("r1")
    assert texts(await asyncio.wait_for(_collect(sub), 5)) == ["last", "stopped"]
    late = store.subscribe(replica_id="r1")
    assert await asyncio.wait_for(_collect(late), 5) == []


async def _collect(sub: LogSubscription) -> list[LogLine]:
    return [line async for line in sub]


def test_rejects_a_max_line_too_small_for_the_marker() -> None:
    with pytest.raises(ValueError, match="max_line"):
        LogStore(FakeClock(), max_line=10)


def test_dropped_lines_are_reported_once_per_marker() -> None:
    reported: list[int] = []
    store = LogStore(FakeClock(), subscriber_queue=2, on_dropped=reported.append)
    store.open("r1", "m")
    sub = store.subscribe(replica_id="r1")
    for i in range(10):
        store.append("r1", "stdout", f"line {i}")
    assert reported == []
    sub.close()
    assert reported == [8]


# issue 21, finding 5: a start's head survives a chatty server


def test_the_ring_keeps_each_starts_head_with_a_marker_before_the_newest_lines() -> None:
    store = LogStore(FakeClock(), ring_lines=4, head_lines=2)
    store.open("r1", "m")
    for i in range(10):
        store.append("r1", STDERR, f"first {i}")
    store.open("r1", "m")  # the start retried on a fresh port: a second process
    for i in range(10):
        store.append("r1", STDERR, f"second {i}")
    assert texts(store.tail_lines("r1", 100)) == [
        "first 0",
        "first 1",
        "[modeld] 8 lines dropped",
        "second 0",
        "second 1",
        "[modeld] 4 lines dropped",
        "second 6",
        "second 7",
        "second 8",
        "second 9",
    ]
    assert texts(store.tail_lines("r1", 3)) == ["second 7", "second 8", "second 9"]
    assert texts(store.tail(model="m", n=100)) == texts(store.tail_lines("r1", 100))


def test_a_head_still_in_the_ring_is_not_repeated() -> None:
    store = LogStore(FakeClock(), ring_lines=10, head_lines=3)
    store.open("r1", "m")
    for i in range(5):
        store.append("r1", STDOUT, f"line {i}")
    assert texts(store.tail_lines("r1", 100)) == [f"line {i}" for i in range(5)]


# issue 21, finding 3: lines the daemon's own probes caused are no progress


async def test_probe_access_lines_are_not_progress_even_in_pieces() -> None:
    clock = FakeClock()
    store = LogStore(clock)
    store.open("r1", "m", probe_line=lambda text: "/health" in text)
    reader = asyncio.StreamReader()
    pump = asyncio.ensure_future(store.pump("r1", STDOUT, reader))
    reader.feed_data(b"loading\n")
    await asyncio.sleep(0)
    loaded_at = store.last_output_at("r1")
    assert loaded_at == clock.monotonic()
    for chunk in (b"GET /health", b" 503\nGET /health 503\n", b"GET /health"):
        clock.advance(1.0)
        reader.feed_data(chunk)
        await asyncio.sleep(0)
        assert store.last_output_at("r1") == loaded_at, chunk
    clock.advance(1.0)
    reader.feed_data(b" 503\nload...")
    await asyncio.sleep(0)
    # Dots of a loader that ends no line are progress.
    clock.advance(1.0)
    reader.feed_data(b"...")
    await asyncio.sleep(0)
    assert store.last_output_at("r1") == clock.monotonic()
    reader.feed_eof()
    await pump
