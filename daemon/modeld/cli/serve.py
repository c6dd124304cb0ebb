"""`modeld serve`: run the Daemon on uvloop until SIGTERM/SIGINT.

The first signal shuts down gracefully; a second one kills every backend at
once and exits, so even an impatient operator leaves no orphans behind.
"""

import asyncio
import gc
import os
import signal
import sys
from concurrent.futures import Future

import structlog
import uvloop

from modeld.config import Config
from modeld.errors import ConfigError, RegistryError
from modeld.server import Daemon
from modeld.supervisor.containment import Containment

log = structlog.get_logger(__name__)
EXIT_FAST = 130


def run(cfg: Config, containment: Future[Containment] | None = None) -> int:
    """`containment`: the mechanism, being chosen already (`choose_soon`)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_main(cfg, containment))


async def _main(cfg: Config, containment: Future[Containment] | None) -> int:
    daemon = Daemon(cfg, containment=containment)
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("signal_received", signal=signal.Signals(signum).name)
            daemon.request_stop()
            return
        log.warning("second_signal_fast_exit", signal=signal.Signals(signum).name)
        daemon.kill_backends()
        os._exit(EXIT_FAST)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await daemon.start()
    except (ConfigError, RegistryError) as exc:
        print(f"modeld: {exc}", file=sys.stderr)
        await daemon.shutdown()
        return 2
    except BaseException:
        # Whatever failed, what did start (registry thread, backends) must not outlive us.
        log.exception("daemon_start_failed")
        await daemon.shutdown()
        return 1
    # What exists now lives as long as the daemon: frozen, no collection scans it again.
    # The GC is turned back on for what the daemon makes from here (main turned it off
    # for the start).
    gc.freeze()
    gc.enable()
    await daemon.run_until_stopped()
    return 0
