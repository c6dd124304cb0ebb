"""A Route that stops waiting for a shared start leaves that start running for others;
whatever the start later ends with must still be retrieved, never reported by the
event loop as "Task exception was never retrieved" (seen in a 150 s soak's daemon log)."""

import asyncio
import gc
from typing import Any

import pytest

from modeld.clock import SystemClock
from modeld.errors import DeadlineExceeded, Unavailable
from modeld.routing.lifecycle import wait_until


async def test_a_start_given_up_on_leaves_no_unretrieved_exception() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    gate = asyncio.Event()
    finished = asyncio.Event()

    async def start() -> None:
        try:
            await gate.wait()
            raise Unavailable("echo was stopped while starting")
        finally:
            finished.set()

    clock = SystemClock()
    with pytest.raises(DeadlineExceeded):
        await wait_until(start(), clock.monotonic() + 0.01, clock, "echo")
    gate.set()
    await finished.wait()
    # The start's task completes in the step that ran its `finally`; one turn more and
    # it is garbage once nothing refers to it.
    await asyncio.sleep(0)
    gc.collect()
    assert [c.get("message") for c in reported] == []
