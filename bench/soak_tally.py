"""What the chaos soak (soak.py) observed, and its figures: one `Tally` per run,
mutated only on the event loop, turned into the JSON figures and the printout."""

import argparse
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from harness import quantile
from modeld._proto.modeld.v1 import modeld_pb2 as pb

# Codes no RPC may ever answer.
NEVER = frozenset({"INTERNAL", "UNKNOWN"})


@dataclass
class Tally:
    """Everything the run observed; one instance, mutated only on the event loop."""

    routes: Counter[str] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    route_ms: list[float] = field(default_factory=list)
    warm_route_ms: list[float] = field(default_factory=list)
    served: int = 0
    predict_failed: int = 0
    pids: set[int] = field(default_factory=set)
    lease_samples: int = 0
    lease_readings: int = 0
    lease_mismatches: int = 0
    max_in_flight: int = 0
    ready_at_end: int = 0
    failures: list[str] = field(default_factory=list)

    def call(self, method: str, code: str) -> None:
        self.calls[f"{method}:{code}"] += 1
        if code in NEVER:
            self.failures.append(f"{method} answered {code}")

    def check_leases(self, replicas: Iterable[pb.Replica], when: str) -> None:
        """In-flight is counted once, by the lease table: any replica whose in_flight
        is not its live lease count is a bookkeeping bug, whenever it is seen."""
        self.lease_samples += 1
        for r in replicas:
            self.lease_readings += 1
            self.max_in_flight = max(self.max_in_flight, r.in_flight)
            if r.in_flight != r.live_leases:
                self.lease_mismatches += 1
                self.failures.append(
                    f"{when}: replica {r.id} ({pb.ReplicaState.Name(r.state)}) has in_flight "
                    f"{r.in_flight} but {r.live_leases} live leases"
                )


def figures(t: Tally, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "duration_s": args.duration,
        "clients": args.clients,
        "routes": dict(t.routes),
        "requests_served": t.served,
        "predict_failed": t.predict_failed,
        "route_p50_ms": round(quantile(t.route_ms, 0.50), 2),
        "route_p99_ms": round(quantile(t.route_ms, 0.99), 2),
        "warm_route_p99_ms": round(quantile(t.warm_route_ms, 0.99), 2),
        "faults_injected": dict(t.faults),
        "replicas_started": t.events["STARTING"],
        "replicas_failed": t.events["FAILED"],
        "crashes_of_ready_replicas": t.events["crashed"],
        "leases_expired": t.events["lease_expired"],
        "backend_pids_seen": len(t.pids),
        "ready_at_end": t.ready_at_end,
        "lease_samples": t.lease_samples,
        "lease_readings": t.lease_readings,
        "lease_mismatches": t.lease_mismatches,
        "max_in_flight_seen": t.max_in_flight,
        "other_calls": {k: v for k, v in t.calls.items() if not k.startswith("Route:")},
        "failures": t.failures[:20],
        "passed": not t.failures,
    }


def _counts(counts: dict[str, int]) -> str:
    listed = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    return f"{sum(counts.values())} ({listed})"


def print_figures(r: dict[str, Any]) -> None:
    print(f"soak: {r['duration_s']:.0f}s, {r['clients']} clients")
    print(f"  routes: {_counts(r['routes'])}")
    print(f"  requests served (Predict OK): {r['requests_served']}, failed {r['predict_failed']}")
    print(
        f"  Route latency during faults: p50 {r['route_p50_ms']} ms, "
        f"p99 {r['route_p99_ms']} ms (warm p99 {r['warm_route_p99_ms']} ms)"
    )
    print(f"  faults injected: {_counts(r['faults_injected'])}")
    print(
        f"  replicas started {r['replicas_started']}, failed {r['replicas_failed']} "
        f"(crashes of READY ones {r['crashes_of_ready_replicas']}), "
        f"leases expired {r['leases_expired']}, backend pids seen {r['backend_pids_seen']}"
    )
    print(
        f"  in_flight == live leases: {r['lease_samples']} samples, {r['lease_readings']} "
        f"replica readings, {r['lease_mismatches']} mismatches (max in_flight seen "
        f"{r['max_in_flight_seen']}); READY at the end {r['ready_at_end']}"
    )
    print(f"  other calls: {_counts(r['other_calls'])}")
    for failure in r["failures"]:
        print(f"  FAILED: {failure}")
    print("soak: PASSED" if r["passed"] else "soak: FAILED")
