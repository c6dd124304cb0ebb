"""What each client verb asks the daemon, and what it prints (a table, or JSON with --json)."""

import argparse
import sys
import time
from typing import Any

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.cli import render
from modeld.cli.connect import Session
from modeld.cli.progress import load_with_progress, watch
from modeld.errors import ConfigError
from modeld.units import parse_duration

# The daemon's routing.stops.DEFAULT_DRAIN, and how its Unload marks leases it cut
# short (supervisor.replica); tests keep these equal.
DEFAULT_DRAIN_S = 30.0
DRAIN_CUT_SHORT = "drain cut short:"


def _call(s: Session, method: str, request: Any) -> Any:
    return getattr(s.stub, method)(request, timeout=s.timeout, metadata=s.metadata)


def _out(text: str) -> None:
    print(text, flush=True)


def ps(args: argparse.Namespace, s: Session) -> None:
    request = pb.ListReplicasRequest(model=args.model or "", local=args.local)
    reply = _call(s, "ListReplicas", request)
    replicas = reply.replicas
    specs = {m.name: m for m in _call(s, "ListModels", pb.ListModelsRequest()).models}
    idle_timeout = render.seconds(_call(s, "GetSettings", pb.GetSettingsRequest()).idle_timeout)
    now = time.time()
    idles = [render.idle(r, specs.get(r.model), idle_timeout, now) for r in replicas]
    if not args.json:
        _out(render.ps_table(replicas, idles, wide=args.wide))
        if reply.queues:
            _out("\n" + render.queues_table(reply.queues))
        return
    rows = []
    for r, i in zip(replicas, idles, strict=True):
        row = render.to_dict(r)
        row["idle_for_seconds"] = i.idle_for
        row["until_eviction_seconds"] = i.until_eviction
        rows.append(row)
    queues = [render.to_dict(q) for q in reply.queues]
    _out(render.to_json({"replicas": rows, "queues": queues}))


def hosts(args: argparse.Namespace, s: Session) -> None:
    reply = _call(s, "ListHosts", pb.ListHostsRequest())
    if args.json:
        _out(render.to_json(reply))
        return
    _out(render.database_line(reply.database, time.time()) + render.hosts_table(reply.hosts))


def models(args: argparse.Namespace, s: Session) -> None:
    reply = _call(s, "ListModels", pb.ListModelsRequest())
    _out(render.to_json(reply) if args.json else render.models_table(reply.models))


def load(args: argparse.Namespace, s: Session) -> None:
    request = pb.LoadRequest(model=args.model, replicas=args.replicas, host=args.host)
    if args.json:
        _out(render.to_json(_call(s, "Load", request)))
        return
    started = time.monotonic()
    reply = load_with_progress(s, request, sys.stdout, started)
    elapsed = time.monotonic() - started
    _out(f"{args.model}: {len(reply.replicas)} replica(s) ready in {elapsed:.2f}s")
    _out(render.replicas_table(reply.replicas))


def unload(args: argparse.Namespace, s: Session) -> None:
    request = pb.UnloadRequest(force=args.force)
    if args.replica:
        request.replica_id = args.replica
    elif args.model:
        request.model = args.model
    else:
        raise ConfigError("unload: name a MODEL or --replica ID")
    drain = DEFAULT_DRAIN_S if args.drain is None else _duration("--drain", args.drain)
    if args.drain is not None:
        request.drain_timeout.FromNanoseconds(int(drain * 1e9))
    if not args.json and not args.force:
        _announce_drain(s, request, drain)
    reply = _call(s, "Unload", request)
    if args.json:
        _out(render.to_json(reply))
        return
    _out(f"stopped {len(reply.stopped)} replica(s)")
    if reply.stopped:
        _out(render.replicas_table(reply.stopped))
    for r in reply.stopped:
        if r.last_error.startswith(DRAIN_CUT_SHORT):
            _out(f"replica {r.id}: {r.last_error}")


def _announce_drain(s: Session, request: pb.UnloadRequest, drain: float) -> None:
    """Say before the wait that there will be one, and how long it may be."""
    listed = _call(s, "ListReplicas", pb.ListReplicasRequest(model=request.model))
    targets = [r for r in listed.replicas if request.model or r.id == request.replica_id]
    out = sum(r.in_flight for r in targets)
    if out:
        _out(
            f"waiting up to {drain:g}s for {out} lease(s) to end "
            "(--force stops at once, --drain sets the wait)"
        )


def route(args: argparse.Namespace, s: Session) -> None:
    request = pb.RouteRequest(model=args.model, affinity_key=args.affinity_key)
    reply = _call(s, "Route", request)
    if args.json:
        _out(render.to_json(reply))
        return
    cold = " (cold start)" if reply.cold_start else ""
    expires = render.wall(reply.lease_expires_at)
    ttl = f", expires in {render.human_duration(expires - time.time())}" if expires else ""
    _out(f"lease {reply.lease_id} -> {reply.address} (replica {reply.replica_id}{cold}{ttl})")


def release(args: argparse.Namespace, s: Session) -> None:
    request = pb.ReleaseRequest(lease_id=args.lease, outcome=args.outcome.upper())
    reply = _call(s, "Release", request)
    if args.json:
        _out(render.to_json(reply))
    else:
        _out("released" if reply.released else "not held (already released or expired)")


def health(args: argparse.Namespace, s: Session) -> None:
    reply = _call(s, "Health", pb.HealthRequest(model=args.model or "", probe=args.probe))
    if args.json:
        _out(render.to_json(reply))
        return
    now = time.time()
    _out(render.database_line(reply.cluster_database, now) + render.health_table(reply.models, now))


def logs(args: argparse.Namespace, s: Session) -> None:
    request = pb.StreamLogsRequest(tail=args.tail, follow=args.follow)
    if args.replica:
        request.replica_id = args.replica
    elif args.model:
        request.model = args.model
    else:
        raise ConfigError("logs: name a MODEL or --replica ID")
    timeout = None if args.follow else s.timeout
    for line in s.stub.StreamLogs(request, timeout=timeout, metadata=s.metadata):
        if args.json:
            _out(render.to_json(line, indent=None))
            continue
        stamp = line.time.ToDatetime().strftime("%H:%M:%S.%f")[:-3]
        _out(f"{stamp} {line.replica_id} {line.stream}: {line.text}")


def events(args: argparse.Namespace, s: Session) -> None:
    stream = watch(s, args.model or "", cluster=args.cluster)
    where = " on every host" if args.cluster else ""
    what = args.model or "every model"
    print(f"watching replica events of {what}{where}", file=sys.stderr, flush=True)
    for event in stream:
        if args.json:
            _out(render.to_json(event, indent=None))
            continue
        stamp = event.time.ToDatetime().strftime("%H:%M:%S.%f")[:-3]
        frm = render.state_name(event.from_state) if event.from_state else "-"
        to = render.state_name(event.to_state)
        if event.health:
            to += f" [{event.health}]"
        host = f"{event.host_id} " if event.host_id else ""
        _out(f"{stamp} {host}{event.model} {event.replica_id} {frm} -> {to}  {event.reason}")


def _duration(flag: str, value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def settings(args: argparse.Namespace, s: Session) -> None:
    changes = pb.Settings()
    for name in ("busy_timeout", "idle_timeout", "watchdog_interval"):
        if (value := getattr(args, name)) is not None:
            flag = "--" + name.replace("_", "-")
            getattr(changes, name).FromNanoseconds(int(_duration(flag, value) * 1e9))
    if args.max_loaded is not None:
        changes.max_loaded = args.max_loaded
    if args.memory_threshold is not None:
        changes.memory_threshold = args.memory_threshold
    if args.force_eviction_when_busy is not None:
        changes.force_eviction_when_busy = args.force_eviction_when_busy == "true"
    if changes.ListFields():
        reply = _call(s, "UpdateSettings", pb.UpdateSettingsRequest(settings=changes))
    else:
        reply = _call(s, "GetSettings", pb.GetSettingsRequest())
    _out(render.to_json(reply) if args.json else render.settings_table(reply))
