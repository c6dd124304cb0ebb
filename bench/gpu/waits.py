"""Deadline-bounded polling for what has no change notification (NVML, /proc, files)."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

POLL_S = 0.05
T = TypeVar("T")


async def until(
    probe: Callable[[], T | Awaitable[T | None] | None], limit_s: float, interval: float = POLL_S
) -> T | None:
    """Poll `probe` until it returns something truthy or `limit_s` passes; None then.

    NVML and /proc have no change notification, so this polls, with a deadline."""
    deadline = time.monotonic() + limit_s
    while True:
        value = probe()
        if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
