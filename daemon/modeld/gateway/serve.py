"""Run the gateway on uvloop until SIGTERM/SIGINT, then let answers in progress finish."""

import asyncio
import signal
import sys

import structlog
import uvloop
from aiohttp import web

from modeld.client import AsyncClient, ConnectOptions
from modeld.config.gateway import GatewayConfig
from modeld.gateway.app import Gateway
from modeld.gateway.auth import Keys
from modeld.gateway.leasing import fail_fast
from modeld.netaddr import split_host_port

log = structlog.get_logger(__name__)
# How long answers still streaming at a stop may go on before they are cut.
SHUTDOWN_GRACE_S = 10.0
# RouteStreams to modeld, taken in turn (see leasing): one connection to modeld each.
ROUTE_STREAMS = 4


def run(cfg: GatewayConfig, connect: ConnectOptions, keys: Keys) -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_main(cfg, connect, keys))


async def _main(cfg: GatewayConfig, connect: ConnectOptions, keys: Keys) -> int:
    clients = [_client(cfg, connect) for _ in range(ROUTE_STREAMS)]
    gateway = Gateway(cfg, clients, keys)
    # handler_cancellation: a client that goes away cancels its request at once, and
    # with it the request to the replica.
    runner = web.AppRunner(
        gateway.app(),
        access_log=None,
        handle_signals=False,
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_GRACE_S,
    )
    await runner.setup()
    try:
        host, port = split_host_port(cfg.listen)
        await web.TCPSite(runner, host or None, port, reuse_address=True).start()
    except OSError as exc:
        print(f"modeld gateway: cannot listen on {cfg.listen}: {exc.strerror}", file=sys.stderr)
        await _close(runner, gateway, clients)
        return 1
    log.info("gateway_listening", listen=cfg.listen, modeld=clients[0].addr, api_keys=keys.required)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("gateway_stopping")
    await _close(runner, gateway, clients)
    return 0


def _client(cfg: GatewayConfig, connect: ConnectOptions) -> AsyncClient:
    return AsyncClient(
        connect.addr,
        token_file=connect.token_file,
        tls_ca=connect.tls_ca,
        tls_cert=connect.tls_cert,
        tls_key=connect.tls_key,
        tls_server_name=connect.tls_server_name,
        timeout=cfg.route_timeout,
        on_retry=fail_fast,
        # Route, Release and renewals as messages on its RouteStream (see leasing).
        stream=True,
    )


async def _close(runner: web.AppRunner, gateway: Gateway, clients: list[AsyncClient]) -> None:
    await runner.cleanup()
    await gateway.close()
    for client in clients:
        await client.close()
