"""The event bus: watchers hold cursors into rings, publishing never touches them."""

import asyncio
import gc
import weakref

from modeld.ops.events import Event, EventBus, Subscription
from modeld.state import ReplicaState

S = ReplicaState


def event(n: int, model: str = "m") -> Event:
    return Event(float(n), f"r{n}", model, S.STARTING, S.READY, reason=str(n))


async def next_event(sub: Subscription) -> Event:
    async with asyncio.timeout(5):
        return await anext(aiter(sub))


async def test_watchers_get_every_event_in_order_and_model_watchers_only_theirs() -> None:
    bus = EventBus()
    everything, of_m = bus.subscribe(), bus.subscribe("m")
    published = [event(0), event(1, "n"), event(2), event(3, "n")]
    for e in published:
        bus.publish(e)
    assert everything.pending() == published
    assert of_m.pending() == [published[0], published[2]]
    assert everything.pending() == []
    assert (everything.dropped, of_m.dropped) == (0, 0)


async def test_a_watcher_that_falls_behind_loses_the_oldest_events_counted() -> None:
    bus = EventBus(queue_size=4)
    slow, slow_n = bus.subscribe(), bus.subscribe("n")
    for n in range(10):
        bus.publish(event(n))
    bus.publish(event(10, "n"))
    assert slow.dropped == 7
    assert [e.reason for e in slow.pending()] == ["7", "8", "9", "10"]
    assert slow.dropped == 7
    assert (slow_n.dropped, [e.reason for e in slow_n.pending()]) == (0, ["10"])


async def test_a_thousand_waiting_watchers_all_receive_an_event() -> None:
    bus = EventBus()
    watchers = [bus.subscribe("m" if i % 2 else None) for i in range(1000)]
    waiting = [asyncio.create_task(next_event(w)) for w in watchers]
    await asyncio.sleep(0)
    assert not any(task.done() for task in waiting)
    bus.publish(event(1))
    assert await asyncio.gather(*waiting) == [event(1)] * 1000


async def test_the_bus_keeps_no_reference_to_a_closed_watcher() -> None:
    bus = EventBus()
    watcher = bus.subscribe("m")
    gone = weakref.ref(watcher)
    reader = asyncio.create_task(next_event(watcher))
    await asyncio.sleep(0)
    assert bus.wakeups.waiting() == 1
    watcher.close()
    await asyncio.wait([reader])
    assert isinstance(reader.exception(), StopAsyncIteration)
    assert bus.subscriber_count == 0
    del watcher, reader
    gc.collect()
    assert gone() is None
    assert bus.wakeups.waiting() == 0
    bus.publish(event(1))


async def test_close_all_lets_watchers_read_what_was_published_then_ends_them() -> None:
    bus = EventBus()
    watcher = bus.subscribe()
    bus.publish(event(1))
    bus.close_all()
    async with asyncio.timeout(5):
        assert [e async for e in watcher] == [event(1)]
        assert [e async for e in bus.subscribe("m")] == []
