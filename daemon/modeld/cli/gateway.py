"""`modeld gateway`: the OpenAI-compatible HTTP front door (see modeld.gateway).

It reaches the daemon as every client verb does (--addr, $MODELD_ADDR, the socket,
the default) unless `[gateway] addr` names it; its other settings are the config
file's `[gateway]` table and `MODELD_GATEWAY_*` variables, which these flags override.
"""

import argparse
import dataclasses
from typing import Any

from modeld import config
from modeld.cli.connect import add_connection_flags
from modeld.client import ConnectOptions
from modeld.errors import ConfigError
from modeld.netaddr import split_host_port
from modeld.ops import logconfig


def add_gateway_verb(sub: Any) -> None:
    help_ = "serve an OpenAI-compatible HTTP API that routes through modeld"
    p = sub.add_parser("gateway", help=help_, description=__doc__)
    p.add_argument("--config", help="TOML config file with a [gateway] table (also MODELD_CONFIG)")
    p.add_argument("--listen", help="HOST:PORT to serve HTTP on (default: 127.0.0.1:8080)")
    p.add_argument("--log-level", help="debug, info, warning or error")
    add_connection_flags(p)
    p.set_defaults(func=_gateway)


def _gateway(args: argparse.Namespace) -> int:
    overrides = {"log_level": args.log_level} if args.log_level else {}
    cfg = config.load(args.config, overrides=overrides)
    gateway = cfg.gateway
    if args.listen:
        try:
            split_host_port(args.listen)
        except ValueError as exc:
            raise ConfigError(f"--listen: {exc}") from None
        gateway = dataclasses.replace(gateway, listen=args.listen)
    if args.timeout is not None:
        gateway = dataclasses.replace(gateway, route_timeout=args.timeout)
    connect = ConnectOptions(
        addr=args.addr or gateway.addr or None,
        token_file=args.token_file or gateway.token_file or None,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_server_name=args.tls_server_name,
    )
    # Files are read before the start, so a bad one stops it with exit code 2.
    connect.resolve()
    from modeld.gateway.auth import Keys, read_keys
    from modeld.gateway.serve import run

    keys = Keys(read_keys(gateway.api_keys_file)) if gateway.api_keys_file else Keys()
    logconfig.configure(cfg.log_level, cfg.log_format)
    return run(gateway, connect, keys)
