"""systemd's notify protocol, spoken directly on the `NOTIFY_SOCKET` datagram socket.

The protocol is one datagram of `KEY=VALUE` lines per message, sent to the unix
socket named by `NOTIFY_SOCKET` (a leading '@' names an abstract socket). When
the variable is unset every method is a no-op, so the daemon calls them freely.

The watchdog ping is only worth something if it proves the daemon works: the
loop that sends it waits on a deadline, and when it wakes more than one interval
late (the event loop was blocked) or the daemon's own check says it is stuck, it
skips the ping and lets systemd's `WatchdogSec` run out.
"""

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Mapping, MutableMapping

import structlog

from modeld.clock import Clock, SystemClock

log = structlog.get_logger(__name__)

# Read once and removed, so backend processes (which inherit the environment)
# cannot speak for the daemon or be mistaken for it.
ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(value: str) -> str | None:
    """The sendto() address for a NOTIFY_SOCKET value; None for forms not supported here."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between pings (half of WATCHDOG_USEC), or None when no watchdog is set for us."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    return int(usec) / 2_000_000


def ping_due(lag: float, interval: float, responsive: bool) -> bool:
    """Ping only when the loop woke within one interval of its deadline and the daemon is fine."""
    return responsive and lag <= interval


class Notifier:
    def __init__(
        self,
        notify_socket: str | None,
        *,
        watchdog_interval: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._clock = clock or SystemClock()
        self._address = socket_address(notify_socket) if notify_socket else None
        self._sock: socket.socket | None = None
        self._closed = asyncio.Event()
        self.skipped = 0
        if notify_socket and self._address is None:
            log.warning("systemd_notify_socket_unsupported", notify_socket=notify_socket)
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        self.interval = watchdog_interval if self._sock is not None else None

    @classmethod
    def from_environ(
        cls,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset: bool = True,
        clock: Clock | None = None,
    ) -> "Notifier":
        """A Notifier for what systemd put in the environment (os.environ by default)."""
        env = os.environ if environ is None else environ
        notifier = cls(
            env.get("NOTIFY_SOCKET"),
            watchdog_interval=watchdog_interval(env, os.getpid()),
            clock=clock,
        )
        if unset:
            for key in ENV_KEYS:
                env.pop(key, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def ready(self) -> None:
        self._send("READY=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        # One message line per assignment: a newline would start a bogus one.
        self._send("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def _send(self, message: str) -> None:
        if self._sock is None or self._address is None or self._closed.is_set():
            return
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError as exc:
            log.warning("systemd_notify_failed", message=message[:40], error=str(exc))

    async def watchdog_loop(self, responsive_check: Callable[[], bool] | None = None) -> None:
        """Ping every interval while the loop runs on time and `responsive_check()` holds.

        Returns at once when no watchdog is configured, else when `close()` is called.
        """
        interval = self.interval
        if interval is None:
            return
        log.info("systemd_watchdog_started", interval_s=interval)
        while True:
            deadline = self._clock.monotonic() + interval
            if await self._closed_within(interval):
                return
            lag = self._clock.monotonic() - deadline
            responsive = responsive_check() if responsive_check is not None else True
            if ping_due(lag, interval, responsive):
                self.watchdog()
            else:
                self.skipped += 1
                log.warning("systemd_watchdog_skipped", lag_s=round(lag, 3), responsive=responsive)

    async def _closed_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._closed.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Stop the watchdog loop and release the socket; later messages are dropped."""
        self._closed.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
