"""The `[gateway]` table of the config file (also `MODELD_GATEWAY_*`), parsed by modeld.config.

Kept free of aiohttp so that the daemon, which only validates the table, never imports
the gateway's HTTP stack.
"""

from dataclasses import dataclass
from typing import Any

from modeld.config.values import Parser
from modeld.config.values import integer as _int
from modeld.config.values import text as _str
from modeld.errors import ConfigError
from modeld.netaddr import split_host_port
from modeld.units import parse_duration, parse_size

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_MAX_BODY = 16 * 1024 * 1024

KEYS: dict[str, Parser] = {
    "listen": _str,
    "addr": _str,
    "token_file": _str,
    "api_keys_file": _str,
    "retry_after": parse_duration,
    "route_timeout": parse_duration,
    "connect_timeout": parse_duration,
    "max_body_bytes": parse_size,
    "max_connections_per_replica": _int,
}


@dataclass(frozen=True)
class GatewayConfig:
    """What `modeld gateway` runs with; the CLI's flags override these."""

    listen: str = DEFAULT_LISTEN
    # The daemon: "" = as every client verb finds it ($MODELD_ADDR, the socket, the default).
    addr: str = ""
    # modeld's token for the gateway's calls ("" = $MODELD_TOKEN_FILE, or none); never forwarded.
    token_file: str = ""
    # Bearer keys clients must send, one a line ("" = no key needed).
    api_keys_file: str = ""
    retry_after: float = 1.0
    route_timeout: float = 300.0
    connect_timeout: float = 5.0
    max_body_bytes: int = DEFAULT_MAX_BODY
    max_connections_per_replica: int = 0


def build(values: dict[str, Any]) -> GatewayConfig:
    """The parsed table's values, checked; a bad one is a ConfigError naming its key."""
    gateway = GatewayConfig(**values)
    try:
        split_host_port(gateway.listen)
    except ValueError as exc:
        raise ConfigError(f"config: gateway.listen: {exc}") from None
    if not 0 <= gateway.retry_after <= 3600:
        raise ConfigError("config: gateway.retry_after: expected 0s..1h")
    for key in ("route_timeout", "connect_timeout"):
        if getattr(gateway, key) <= 0:
            raise ConfigError(f"config: gateway.{key}: must be positive")
    if not 1024 <= gateway.max_body_bytes <= 1 << 30:
        raise ConfigError("config: gateway.max_body_bytes: expected 1KiB..1GiB")
    if gateway.max_connections_per_replica < 0:
        raise ConfigError("config: gateway.max_connections_per_replica: 0 (no limit) or more")
    return gateway
