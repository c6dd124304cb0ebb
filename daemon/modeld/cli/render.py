"""Tables for people: aligned columns, durations and sizes in human units."""

import time
from collections.abc import Iterable, Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from modeld._proto.modeld.v1 import modeld_pb2 as pb
from modeld.units import format_size


def print_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    rows = [tuple(str(c) for c in row) for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    for row in (tuple(header), *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def ago(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    seconds = max(time.time() - ts.ToNanoseconds() / 1e9, 0.0)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def print_replicas(replicas: Iterable[pb.Replica], *, probe: bool = False) -> None:
    header = ["MODEL", "REPLICA", "STATE", "ADDRESS", "PID", "GPU", "MEMORY", "IN-FLIGHT", "IDLE"]
    if probe:
        header += ["PROBE", "PROBED"]
    rows = []
    for r in replicas:
        row = [
            r.model,
            r.id,
            pb.ReplicaState.Name(r.state),
            r.address or "-",
            str(r.pid or "-"),
            r.gpu or "-",
            format_size(r.memory) if r.memory else "-",
            str(r.in_flight),
            ago(r.last_used) if r.state == pb.READY and not r.in_flight else "-",
        ]
        if probe:
            row += ["ok" if r.last_probe_ok else "-", ago(r.last_probe_at)]
        rows.append(row)
    print_table(header, rows)
