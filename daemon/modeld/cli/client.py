"""Client verbs: their arguments, and the one place a failed call becomes an exit status.

A failed call prints `modeld: CODE: message` on one line to stderr and exits 1
(with --json: the JSON error of `cli.failure`).
"""

import argparse
from collections.abc import Callable
from typing import Any

import grpc

from modeld.cli import failure, verbs
from modeld.cli.connect import Session, add_connection_flags, connect

Verb = Callable[[argparse.Namespace, Session], None]


def _run(fn: Verb) -> Callable[[argparse.Namespace], int]:
    def verb(args: argparse.Namespace) -> int:
        session = connect(args)
        try:
            fn(args, session)
        except grpc.RpcError as exc:
            return failure.of_rpc(exc, session.addr).report(args.json)
        finally:
            session.close()
        return 0

    return verb


def _add(sub: Any, name: str, fn: Verb, help_: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_connection_flags(p)
    p.set_defaults(func=_run(fn))
    return p


def _lifecycle_verbs(sub: Any) -> None:
    p = _add(sub, "load", verbs.load, "start replicas of a model and wait until they are ready")
    p.add_argument("model")
    p.add_argument("--replicas", type=int, default=1, help="how many READY replicas to have")
    p.add_argument("--host", default="", help="in a cluster: the host_id to load on")
    p = _add(sub, "unload", verbs.unload, "stop a model's replicas (or one replica)")
    p.add_argument("model", nargs="?")
    p.add_argument("--replica", help="stop just this replica id")
    p.add_argument("--force", action="store_true", help="do not wait for leases to end")
    p.add_argument(
        "--drain",
        # The daemon's routing.stops.DEFAULT_DRAIN; a test keeps the two equal.
        help="how long to wait for leases to end, e.g. 5m (default: 30s); "
        "leases still out then are cut short",
    )
    p = _add(sub, "route", verbs.route, "lease a ready replica of a model")
    p.add_argument("model")
    p.add_argument("--affinity-key", default="", help="requests with one key go to one replica")
    p = _add(sub, "release", verbs.release, "give a lease back")
    p.add_argument("lease")
    p.add_argument(
        "--outcome", default="ok", choices=("ok", "backend_unreachable", "backend_error")
    )


def _watch_verbs(sub: Any) -> None:
    p = _add(sub, "health", verbs.health, "replica health (cached probe results unless --probe)")
    p.add_argument("model", nargs="?")
    p.add_argument("--probe", action="store_true", help="probe every replica now")
    p = _add(sub, "logs", verbs.logs, "print a model's backend logs (stdout, stderr, modeld)")
    p.add_argument("model", nargs="?")
    p.add_argument("--replica", help="one replica's logs instead of a model's")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("--tail", type=int, default=100, help="newest buffered lines to print first")
    p = _add(sub, "events", verbs.events, "follow replica state changes")
    p.add_argument("model", nargs="?")
    p.add_argument("--cluster", action="store_true", help="in a cluster: other hosts' replicas too")


def add_client_verbs(sub: Any) -> None:
    p = _add(sub, "ps", verbs.ps, "list replicas, their load and when they will be evicted")
    p.add_argument("model", nargs="?")
    p.add_argument("--local", action="store_true", help="in a cluster: this host's only")
    p.add_argument(
        "--wide", action="store_true", help="also the load the backends report (load_metrics)"
    )
    _add(sub, "hosts", verbs.hosts, "list the cluster's hosts, their state and replicas")
    _add(sub, "models", verbs.models, "list model specs")
    _lifecycle_verbs(sub)
    _watch_verbs(sub)
    p = _add(sub, "settings", verbs.settings, "show or change runtime settings (persisted)")
    p.add_argument("--busy-timeout", help="a duration such as 30s or 5m; 0 turns it off")
    p.add_argument("--idle-timeout", help="a duration such as 30s or 5m; 0 turns it off")
    p.add_argument(
        "--watchdog-interval",
        help="how often the watchdog looks, 10ms..1h, such as 500ms (it cannot be turned off)",
    )
    p.add_argument("--max-loaded", type=int, help="most replicas at once; 0 is no limit")
    p.add_argument("--memory-threshold", type=float, help="fraction 0..1 of device memory")
    p.add_argument("--force-eviction-when-busy", choices=("true", "false"))
