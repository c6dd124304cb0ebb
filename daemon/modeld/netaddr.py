"""Listen addresses: `host:port` (IPv6 in brackets) and gRPC's unix socket forms."""

import errno
import ipaddress
import socket

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
UNIX_PREFIXES = ("unix:", "unix-abstract:")


def is_unix(address: str) -> bool:
    return address.startswith(UNIX_PREFIXES)


def split_host_port(address: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` → (host, port); an empty host means every interface."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 host needs brackets, as in [::1]:{port}, got {address!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 (also IPv4-mapped) and the usual localhost names."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def why_unbindable(address: str) -> str | None:
    """Why `host:port` cannot be listened on, found by trying (gRPC does not say), or
    None when a bind works now or the address is not host:port."""
    try:
        host, port = split_host_port(address)
    except ValueError:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return (
                "address already in use; is another modeld running there? "
                f"(`modeld health --addr {address}` asks it)"
            )
        return str(exc.strerror or exc)
    return None
