"""The turnstile server streams go through: bounded per loop turn and per second."""

import asyncio
from collections import Counter

import pytest

from modeld.api.pacing import Turnstile


async def test_at_most_per_turn_pass_each_loop_turn_in_arrival_order() -> None:
    gate = Turnstile(per_turn=2, per_second=1e9, burst=100)
    passed: list[tuple[int, int]] = []
    turn = 0

    async def ticker() -> None:
        nonlocal turn
        while True:
            turn += 1
            await asyncio.sleep(0)

    async def walker(i: int) -> None:
        await gate.turn()
        passed.append((i, turn))

    ticking = asyncio.create_task(ticker())
    async with asyncio.timeout(5):
        await asyncio.gather(*(walker(i) for i in range(9)))
    ticking.cancel()
    assert [i for i, _ in passed] == list(range(9))
    assert max(Counter(t for _, t in passed).values()) <= 2
    assert len({t for _, t in passed}) >= 5


async def test_past_the_burst_walkers_wait_for_tokens() -> None:
    gate = Turnstile(per_turn=100, per_second=4, burst=4)
    walkers = [asyncio.create_task(gate.turn()) for _ in range(8)]
    finished = asyncio.as_completed(walkers)
    async with asyncio.timeout(5):
        for _ in range(4):  # the burst
            await next(finished)
    # One more token is due every 250 ms; the rest wait for theirs.
    assert 1 <= gate.waiting() <= 4
    async with asyncio.timeout(5):
        await asyncio.gather(*walkers)
    assert gate.waiting() == 0


async def test_a_cancelled_walker_gives_up_its_place() -> None:
    gate = Turnstile(per_turn=1, per_second=1e9, burst=100)
    first = asyncio.create_task(gate.turn())
    second = asyncio.create_task(gate.turn())
    third = asyncio.create_task(gate.turn())
    await asyncio.sleep(0)
    assert first.done()
    second.cancel()
    async with asyncio.timeout(5):
        await third
    assert second.cancelled()


def test_rejects_a_gate_that_lets_nothing_through() -> None:
    with pytest.raises(ValueError):
        Turnstile(per_turn=0, per_second=10, burst=10)
