"""Bounded work for server streams (log followers, event watchers).

Sending one message on a gRPC stream costs the daemon a tenth of a millisecond or
more, and a client that never reads still takes megabytes before HTTP/2 flow
control stops the stream (gRPC grows its windows). Hundreds of such streams would
keep the loop busy with sends, delay every unary RPC and take the CPU from the
backends. So streams go through a turnstile: at most `per_turn` messages per
event-loop turn (what a unary RPC may have to wait behind) and at most `per_second`
on average after a burst of `burst` (what streams may cost the host), first come
first served. Streams that cannot keep up fall behind their ring and are told, by
a log follower's drop marker, what they lost.
"""

import asyncio
from collections import deque


class Turnstile:
    def __init__(self, per_turn: int, per_second: float, burst: int) -> None:
        if per_turn < 1 or per_second < 1 or burst < 1:
            raise ValueError("per_turn, per_second and burst must be >= 1")
        self._per_turn = per_turn
        self._rate = per_second
        self._burst = burst
        self._tokens = float(burst)
        self._refilled_at: float | None = None
        self._passed = 0  # in the current turn
        self._queue: deque[asyncio.Future[None]] = deque()
        self._scheduled = False

    async def turn(self) -> None:
        """Returns at once while there is room, else in a later turn."""
        loop = asyncio.get_running_loop()
        self._refill(loop.time())
        if not self._queue and self._passed < self._per_turn and self._tokens >= 1:
            self._pass()
            self._schedule(loop)
            return
        waiter = loop.create_future()
        self._queue.append(waiter)
        self._schedule(loop)
        await waiter

    def waiting(self) -> int:
        return len(self._queue)

    def _pass(self) -> None:
        self._passed += 1
        self._tokens -= 1

    def _refill(self, now: float) -> None:
        if self._refilled_at is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._refilled_at) * self._rate)
        self._refilled_at = now

    def _schedule(self, loop: asyncio.AbstractEventLoop, delay: float = 0.0) -> None:
        if self._scheduled:
            return
        self._scheduled = True
        if delay > 0:
            loop.call_later(delay, self._next_turn, loop)
        else:
            loop.call_soon(self._next_turn, loop)

    def _next_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        """Runs once per loop turn (or when tokens are due) while anyone passes or waits."""
        self._scheduled = False
        self._passed = 0
        self._refill(loop.time())
        while self._queue and self._passed < self._per_turn and self._tokens >= 1:
            waiter = self._queue.popleft()
            if not waiter.done():  # a cancelled waiter gave up its place
                waiter.set_result(None)
                self._pass()
        if self._queue and self._tokens < 1:
            # Out of tokens: come back when a turn's worth is due, not for each one.
            due = min(self._per_turn, len(self._queue))
            self._schedule(loop, (due - self._tokens) / self._rate)
        elif self._queue or self._passed:
            self._schedule(loop)
