"""Client verbs: talk to a running daemon over gRPC and print for people (or --json)."""

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld._proto.modeld.v1 import modeld_pb2_grpc as pb_grpc
from modeld.cli.render import print_replicas, print_table
from modeld.units import parse_duration

DEFAULT_SOCKET = Path("/run/modeld/modeld.sock")
DEFAULT_TCP = "127.0.0.1:50051"
Stub = pb_grpc.ModelControlStub


def default_addr() -> str:
    if addr := os.environ.get("MODELD_ADDR"):
        return addr
    return f"unix://{DEFAULT_SOCKET}" if DEFAULT_SOCKET.exists() else DEFAULT_TCP


def _stub(args: argparse.Namespace) -> Stub:
    channel = grpc.insecure_channel(args.addr)
    return pb_grpc.ModelControlStub(channel)  # type: ignore[no-untyped-call]


def _dump(msg: Message) -> None:
    print(json.dumps(MessageToDict(msg, preserving_proto_field_name=True), indent=2))


def _run(fn: Callable[[argparse.Namespace, Stub], None]) -> Callable[[argparse.Namespace], int]:
    def verb(args: argparse.Namespace) -> int:
        try:
            fn(args, _stub(args))
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            print(f"modeld: {code}: {details}", file=sys.stderr)
            return 1
        return 0

    return verb


def _ps(args: argparse.Namespace, stub: Stub) -> None:
    reply = stub.ListReplicas(pb.ListReplicasRequest(model=args.model or ""), timeout=args.timeout)
    if args.json:
        _dump(reply)
    else:
        print_replicas(reply.replicas)


def _models(args: argparse.Namespace, stub: Stub) -> None:
    reply = stub.ListModels(pb.ListModelsRequest(), timeout=args.timeout)
    if args.json:
        _dump(reply)
        return
    rows = [
        (
            m.name,
            m.backend,
            m.model_file or "-",
            f"{m.min_replicas}..{m.max_replicas}",
            "yes" if m.pinned else "",
            ",".join(m.groups),
            m.source,
        )
        for m in reply.models
    ]
    print_table(("MODEL", "BACKEND", "FILE", "REPLICAS", "PINNED", "GROUPS", "SOURCE"), rows)


def _load(args: argparse.Namespace, stub: Stub) -> None:
    started = time.monotonic()
    stop = threading.Event()
    if not args.json:
        threading.Thread(
            target=_progress, args=(stub, args.model, started, stop), daemon=True
        ).start()
    try:
        reply = stub.Load(
            pb.LoadRequest(model=args.model, replicas=args.replicas), timeout=args.timeout
        )
    finally:
        stop.set()
    if args.json:
        _dump(reply)
    else:
        elapsed = time.monotonic() - started
        print(f"{args.model}: {len(reply.replicas)} replica(s) ready in {elapsed:.2f}s")
        print_replicas(reply.replicas)


def _progress(stub: Stub, model: str, started: float, stop: threading.Event) -> None:
    stream = stub.WatchEvents(pb.WatchEventsRequest(model=model))
    stop_thread = threading.Thread(target=lambda: (stop.wait(), stream.cancel()), daemon=True)
    stop_thread.start()
    try:
        for event in stream:
            state = pb.ReplicaState.Name(event.to_state).lower().replace("_", " ")
            reason = f" ({event.reason})" if event.reason else ""
            print(
                f"  {time.monotonic() - started:6.2f}s  {event.replica_id}  {state}{reason}",
                flush=True,
            )
    except grpc.RpcError:
        return


def _unload(args: argparse.Namespace, stub: Stub) -> None:
    request = pb.UnloadRequest(force=args.force)
    if args.replica:
        request.replica_id = args.replica
    elif args.model:
        request.model = args.model
    else:
        raise SystemExit("modeld unload: name a MODEL or --replica ID")
    if args.drain is not None:
        request.drain_timeout.FromNanoseconds(int(parse_duration(args.drain) * 1e9))
    reply = stub.Unload(request, timeout=args.timeout)
    if args.json:
        _dump(reply)
    else:
        print(f"stopped {len(reply.stopped)} replica(s)")
        print_replicas(reply.stopped)


def _route(args: argparse.Namespace, stub: Stub) -> None:
    reply = stub.Route(pb.RouteRequest(model=args.model), timeout=args.timeout)
    if args.json:
        _dump(reply)
    else:
        cold = " (cold start)" if reply.cold_start else ""
        print(f"lease {reply.lease_id} -> {reply.address} replica {reply.replica_id}{cold}")


def _release(args: argparse.Namespace, stub: Stub) -> None:
    request = pb.ReleaseRequest(lease_id=args.lease, outcome=args.outcome.upper())
    reply = stub.Release(request, timeout=args.timeout)
    if args.json:
        _dump(reply)
    else:
        print("released" if reply.released else "not held (already released or expired)")


def _health(args: argparse.Namespace, stub: Stub) -> None:
    reply = stub.Health(
        pb.HealthRequest(model=args.model or "", probe=args.probe), timeout=args.timeout
    )
    if args.json:
        _dump(reply)
        return
    print_replicas([r for m in reply.models for r in m.replicas], probe=True)


def _logs(args: argparse.Namespace, stub: Stub) -> None:
    request = pb.StreamLogsRequest(tail=args.tail, follow=args.follow)
    if args.replica:
        request.replica_id = args.replica
    else:
        request.model = args.model
    for line in stub.StreamLogs(request, timeout=None if args.follow else args.timeout):
        if args.json:
            print(json.dumps(MessageToDict(line, preserving_proto_field_name=True)), flush=True)
        else:
            stamp = line.time.ToDatetime().strftime("%H:%M:%S.%f")[:-3]
            print(f"{stamp} {line.replica_id} {line.stream}: {line.text}", flush=True)


def _events(args: argparse.Namespace, stub: Stub) -> None:
    for event in stub.WatchEvents(pb.WatchEventsRequest(model=args.model or "")):
        if args.json:
            print(json.dumps(MessageToDict(event, preserving_proto_field_name=True)), flush=True)
            continue
        stamp = event.time.ToDatetime().strftime("%H:%M:%S.%f")[:-3]
        frm, to = (pb.ReplicaState.Name(s) for s in (event.from_state, event.to_state))
        print(f"{stamp} {event.model} {event.replica_id} {frm} -> {to} {event.reason}", flush=True)


def _settings(args: argparse.Namespace, stub: Stub) -> None:
    changes = pb.Settings()
    for name in ("busy_timeout", "idle_timeout", "watchdog_interval"):
        if (value := getattr(args, name)) is not None:
            getattr(changes, name).FromNanoseconds(int(parse_duration(value) * 1e9))
    if args.max_loaded is not None:
        changes.max_loaded = args.max_loaded
    if args.memory_threshold is not None:
        changes.memory_threshold = args.memory_threshold
    if args.force_eviction_when_busy is not None:
        changes.force_eviction_when_busy = args.force_eviction_when_busy == "true"
    if changes.ListFields():
        reply = stub.UpdateSettings(
            pb.UpdateSettingsRequest(settings=changes), timeout=args.timeout
        )
    else:
        reply = stub.GetSettings(pb.GetSettingsRequest(), timeout=args.timeout)
    if args.json:
        _dump(reply)
        return
    shown = MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    print_table(("SETTING", "VALUE"), sorted((k, str(v)) for k, v in shown.items()))


def _add(sub: Any, name: str, fn: Callable[[argparse.Namespace, Stub], None], help_: str) -> Any:
    p = sub.add_parser(name, help=help_)
    p.add_argument("--addr", default=default_addr(), help="daemon address (MODELD_ADDR)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for the daemon")
    p.set_defaults(func=_run(fn))
    return p


def add_client_verbs(sub: Any) -> None:
    _add(sub, "ps", _ps, "list replicas").add_argument("model", nargs="?")
    _add(sub, "models", _models, "list model specs")
    p = _add(sub, "load", _load, "start replicas of a model and wait until ready")
    p.add_argument("model")
    p.add_argument("--replicas", type=int, default=1)
    p = _add(sub, "unload", _unload, "stop a model's replicas (or one replica)")
    p.add_argument("model", nargs="?")
    p.add_argument("--replica", help="stop just this replica id")
    p.add_argument("--force", action="store_true", help="do not wait for leases to end")
    p.add_argument("--drain", help="how long to wait for leases, e.g. 30s")
    _add(sub, "route", _route, "lease a ready replica of a model").add_argument("model")
    p = _add(sub, "release", _release, "give a lease back")
    p.add_argument("lease")
    p.add_argument(
        "--outcome", default="ok", choices=("ok", "backend_unreachable", "backend_error")
    )
    p = _add(sub, "health", _health, "replica health (cached unless --probe)")
    p.add_argument("model", nargs="?")
    p.add_argument("--probe", action="store_true", help="probe every replica now")
    p = _add(sub, "logs", _logs, "print a model's backend logs")
    p.add_argument("model", nargs="?")
    p.add_argument("--replica", help="one replica's logs instead of a model's")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--tail", type=int, default=100)
    _add(sub, "events", _events, "follow replica state changes").add_argument("model", nargs="?")
    p = _add(sub, "settings", _settings, "show or change runtime settings")
    for flag in ("--busy-timeout", "--idle-timeout", "--watchdog-interval"):
        p.add_argument(flag, help="a duration such as 30s or 5m; 0 turns it off")
    p.add_argument("--max-loaded", type=int)
    p.add_argument("--memory-threshold", type=float)
    p.add_argument("--force-eviction-when-busy", choices=("true", "false"))
