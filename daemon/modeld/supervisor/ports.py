"""Which port a backend listens on, and whether a backend said it could not have it.

A port found by binding port 0 is an ephemeral port: any outgoing connection on the
host may take it between modeld's choice and the backend's bind. Backend ports come
from `backend_ports` instead, a range the kernel never hands out for outgoing
connections when it lies outside `ip_local_port_range`; a port in use is skipped.
Someone can still take a port in that moment, so a backend that says it could not
bind (in any of the words real servers use) lost a race: the start sequence
(starting.py) retries it on the next port, `start_attempts` times at most.
"""

import random
import socket
from pathlib import Path

from modeld.supervisor.readiness import StartFailed

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# What real backends print when their port is taken, lowercased (issue 21, finding 7).
BIND_FAILURES = (
    "address already in use",  # the errno text: Python, Go (LocalAI), uvicorn's full line
    "address in use",  # musl and some Python builds
    "failed to bind to address",  # grpc-python's add_insecure_port
    "error while attempting to bind on address",  # uvicorn (vLLM, llama_cpp.server)
    "couldn't bind http server socket",  # llama.cpp's llama-server
)


def bind_failed(line: str) -> bool:
    """Whether a backend's output line says it could not bind its port."""
    lowered = line.lower()
    return any(text in lowered for text in BIND_FAILURES)


def port_free(host: str, port: int) -> bool:
    """Whether nothing holds `port` on any address of `host`'s family (a backend told
    to listen on `host` may still bind the wildcard)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    wildcard = "::" if family == socket.AF_INET6 else ""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((wildcard, port))
        except OSError:
            return False
    return True


class PortRange:
    """Hands out the ports of [first, last] in turn, skipping those in use.

    Each call goes on after the port it handed out last, so two starts at once never
    get the same port and a port just lost is not tried again at once. The first
    call starts at `start` (random by default, so modelds sharing a range spread).
    Called from the event loop only: the position has one owner and no await.
    """

    def __init__(self, first: int, last: int, *, start: int | None = None) -> None:
        self.first = first
        self.last = last
        size = last - first + 1
        self._next = (start - first) if start is not None else random.randrange(size)

    def __call__(self, host: str) -> int:
        size = self.last - self.first + 1
        for _ in range(size):
            port = self.first + self._next % size
            self._next = (self._next + 1) % size
            if port_free(host, port):
                return port
        raise StartFailed(
            "spawn",
            f"every port of backend_ports {self.first}-{self.last} is in use; "
            "widen the range or stop what holds them",
        )


def ephemeral_overlap(ports: tuple[int, int], path: Path = EPHEMERAL_RANGE) -> str | None:
    """A warning when `ports` overlaps the kernel's ephemeral range; None when it does
    not or the range cannot be read (not Linux)."""
    try:
        low, high = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):
        return None
    first, last = ports
    if last < low or first > high:
        return None
    return (
        f"backend_ports {first}-{last} overlaps the kernel's ephemeral port range "
        f"{low}-{high} ({path}): outgoing connections may take a backend's port before "
        "it binds (each such start is retried on another port); choose a range outside it"
    )
