"""Tables for people: aligned columns, durations and sizes in human units.

Everything here is pure: the caller passes `now` (wall clock seconds), so a table
can be checked against fixed data.
"""

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.units import format_size


def to_dict(msg: Message) -> dict[str, Any]:
    return MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def to_json(msg: Message | Mapping[str, Any], *, indent: int | None = 2) -> str:
    data = to_dict(msg) if isinstance(msg, Message) else msg
    return json.dumps(data, indent=indent)


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    cells = [tuple(str(c) for c in row) for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in (tuple(header), *cells))  # fmt: skip
    return "\n".join(lines)


def human_duration(seconds: float) -> str:
    """4s, 4m10s, 1h05m, 2d03h: two units at most, rounded down."""
    s = int(max(seconds, 0.0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def wall(ts: Timestamp) -> float | None:
    if not ts.seconds and not ts.nanos:
        return None
    return ts.ToNanoseconds() / 1e9


def seconds(d: Duration) -> float:
    return d.ToNanoseconds() / 1e9


def state_name(state: int) -> str:
    return pb.ReplicaState.Name(state)


def phase(state: int) -> str:
    """STARTING → "starting", WAITING_READY → "waiting ready"."""
    return state_name(state).lower().replace("_", " ")


@dataclass(frozen=True)
class Idle:
    """How long a replica has been idle and how long until the idle timeout stops it."""

    idle_for: float | None  # None: not idle (busy, or not READY)
    until_eviction: float | None  # None: never evicted for idleness (or not idle)
    note: str  # what the UNTIL EVICTION column says when there is no number


def idle(replica: pb.Replica, spec: pb.ModelSpec | None, idle_timeout: float, now: float) -> Idle:
    """The watchdog's idle rule (eviction.idle_evictions), as seen from outside."""
    last = wall(replica.last_used)
    if replica.state == pb.READY and replica.in_flight:
        return Idle(None, None, "busy")
    if replica.state != pb.READY or last is None:
        return Idle(None, None, "-")
    idle_for = max(now - last, 0.0)
    if spec is not None and spec.pinned:
        return Idle(idle_for, None, "never (pinned)")
    ttl = seconds(spec.idle_ttl) if spec is not None and spec.HasField("idle_ttl") else idle_timeout
    if ttl <= 0:
        return Idle(idle_for, None, "never")
    return Idle(idle_for, max(ttl - idle_for, 0.0), "")


REPLICA_HEADER = ("MODEL", "REPLICA", "STATE", "ADDRESS", "PID", "GPU", "MEMORY", "IN-FLIGHT")


def replica_state(r: pb.Replica) -> str:
    """The state, or SUSPECT with the first line of why for a READY replica in doubt."""
    if r.suspect and r.state == pb.READY:
        return f"SUSPECT ({r.suspect.splitlines()[0]})"
    return state_name(r.state)


def _replica_cells(r: pb.Replica) -> list[str]:
    return [
        r.model,
        r.id,
        replica_state(r),
        r.address or "-",
        str(r.pid or "-"),
        r.gpu or "-",
        format_size(r.memory) if r.memory else "-",
        str(r.in_flight),
    ]


WIDE_HEADER = ("WAITING", "RUNNING", "KV CACHE")


def _load_cells(r: pb.Replica) -> list[str]:
    """What the backend reported (load_metrics); "-" without a report."""
    if not r.load_reported:
        return ["-", "-", "-"]
    kv = f"{r.kv_cache_usage:.0%}" if r.kv_cache_usage >= 0 else "-"
    return [str(r.load_waiting), str(r.load_running), kv]


def ps_table(replicas: Sequence[pb.Replica], idles: Sequence[Idle], *, wide: bool = False) -> str:
    """One row per replica; a HOST column first when they come from a cluster; with
    `wide`, the load each backend reports."""
    cluster = any(r.host_id for r in replicas)
    rows = []
    for r, i in zip(replicas, idles, strict=True):
        until = human_duration(i.until_eviction) if i.until_eviction is not None else i.note
        idle_for = human_duration(i.idle_for) if i.idle_for is not None else "-"
        host = [r.host_id] if cluster else []
        load = _load_cells(r) if wide else []
        rows.append([*host, *_replica_cells(r), idle_for, until, *load])
    header = (*REPLICA_HEADER, "IDLE FOR", "UNTIL EVICTION", *(WIDE_HEADER if wide else ()))
    return table(("HOST", *header) if cluster else header, rows)


def queues_table(queues: Iterable[pb.ModelQueue]) -> str:
    """Routes waiting for a slot, per model with `parallel` set (below `modeld ps`)."""
    rows = [
        (
            q.model,
            str(q.length),
            human_duration(seconds(q.oldest_wait)) if q.length else "-",
            str(q.parallel),
            str(q.queue_max),
        )
        for q in queues
    ]
    return table(("MODEL", "QUEUED", "OLDEST WAIT", "PARALLEL", "QUEUE MAX"), rows)


def replicas_table(replicas: Iterable[pb.Replica]) -> str:
    return table(REPLICA_HEADER, [_replica_cells(r) for r in replicas])


def ago(ts: Timestamp, now: float) -> str:
    at = wall(ts)
    return "-" if at is None else human_duration(now - at) + " ago"


def health_table(models: Iterable[pb.ModelHealth], now: float) -> str:
    rows = []
    for m in models:
        if not m.replicas:
            rows.append([m.model, "-", "no replicas", "-", "-", "-", ""])
        for r in m.replicas:
            ok = "ok" if r.last_probe_ok else ("failed" if wall(r.last_probe_at) else "-")
            error = r.last_error.splitlines()[0] if r.last_error else ""
            cells = [r.id, replica_state(r), r.address or "-", ok, ago(r.last_probe_at, now)]
            rows.append([m.model, *cells, error])
    return table(("MODEL", "REPLICA", "STATE", "ADDRESS", "PROBE", "PROBED", "LAST ERROR"), rows)


def models_table(models: Iterable[pb.ModelSpec]) -> str:
    rows = [
        (
            m.name,
            m.backend,
            m.model_file or "-",
            f"{m.min_replicas}..{m.max_replicas}",
            "yes" if m.pinned else "",
            human_duration(seconds(m.idle_ttl)) if m.HasField("idle_ttl") else "default",
            ",".join(m.groups),
            m.source,
        )
        for m in models
    ]
    header = ("MODEL", "BACKEND", "FILE", "REPLICAS", "PINNED", "IDLE TTL", "GROUPS", "SOURCE")
    return table(header, rows)


def settings_table(s: pb.Settings) -> str:
    def dur(d: Duration, zero: str) -> str:
        value = seconds(d)
        return zero if value == 0 else human_duration(value) if value >= 1 else f"{value:g}s"

    rows = [
        ("busy_timeout", dur(s.busy_timeout, "off")),
        ("idle_timeout", dur(s.idle_timeout, "never")),
        ("max_loaded", str(s.max_loaded) if s.max_loaded else "no limit"),
        ("memory_threshold", f"{s.memory_threshold:g}" if s.memory_threshold else "off"),
        ("force_eviction_when_busy", str(s.force_eviction_when_busy).lower()),
        ("watchdog_interval", dur(s.watchdog_interval, "0s")),
    ]
    return table(("SETTING", "VALUE"), rows)


def host_state_name(state: int) -> str:
    """HOST_SUSPECT → "suspect"."""
    return pb.HostState.Name(state).removeprefix("HOST_").lower()


def free_memory(host: pb.Host) -> str:
    """Free of total memory per GPU ("gpu0:12.0GiB/80.0GiB gpu1:..."), else of host
    RAM ("ram:..."), as the host last published them; "-" before it did."""

    def cell(name: str, free: int, total: int) -> str:
        return f"{name}:{format_size(free)}" + (f"/{format_size(total)}" if total else "")

    if host.gpu_free:
        totals = [*host.gpu_total, *[0] * len(host.gpu_free)]
        return " ".join(cell(f"gpu{i}", n, totals[i]) for i, n in enumerate(host.gpu_free))
    if host.ram_total:
        return cell("ram", host.ram_free, host.ram_total)
    return "-"


def database_line(link: pb.DatabaseLink, now: float) -> str:
    """One line when this modeld cannot reach the cluster database, else ''."""
    if link.up or not link.where:
        return ""
    since = wall(link.down_since)
    when = "" if since is None else f" since {time.strftime('%H:%M:%S', time.localtime(since))}"
    return (
        f"database unreachable{when} ({ago(link.down_since, now)}, {link.attempts} "
        f"attempts): {link.where}: {link.error}\n  this host sees no other host and no "
        "other host sees it; it keeps retrying\n"
    )


def hosts_table(hosts: Iterable[pb.Host]) -> str:
    rows = [
        (
            f"{h.host_id} (here)" if h.local else h.host_id,
            h.address or "-",
            h.role or "-",
            host_state_name(h.state),
            ",".join(f"{k}={v}" for k, v in sorted(h.labels.items())) or "-",
            free_memory(h),
            str(h.replicas),
            f"{seconds(h.heartbeat_age):.1f}s ago" if h.HasField("heartbeat_age") else "-",
        )
        for h in hosts
    ]
    header = ("HOST", "ADDRESS", "ROLE", "STATE", "LABELS", "FREE MEMORY", "REPLICAS", "HEARTBEAT")
    return table(header, rows)
