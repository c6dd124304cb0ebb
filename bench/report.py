"""The route benchmark's verdicts and its printed table."""

from collections.abc import Callable
from typing import Any

from harness import Target, targets_table
from latency_figures import render as latency_lines

HEADLINE_CONCURRENCY = "16"
# Issue 23: a warm Route+Release within 8 % of an empty pair, in pairs/s and in the
# daemon's CPU per pair; a pair on a RouteStream past the unary limit.
ROUTE_OVER_EMPTY = 0.92
CPU_ROUTE_OVER_EMPTY = 1.15
STREAM_OVER_EMPTY = 2.0
MODELD_OVER_REFERENCE = 3.5
SERVING_MS = 200.0
IDLE_RSS_MIB = 45.0
# The figures printed next to the previous run's: (label, path in the results).
HEADLINE = {
    "route/empty pairs/s": ("throughput", "ratios", HEADLINE_CONCURRENCY, "route_over_empty"),
    "daemon CPU/pair route/empty": (
        "throughput",
        "ratios",
        HEADLINE_CONCURRENCY,
        "cpu_route_over_empty",
    ),
    "stream/empty pairs/s": ("throughput", "ratios", HEADLINE_CONCURRENCY, "stream_over_empty"),
    "start -> SERVING, median ms": ("startup", "serving_median_ms"),
    "idle RSS, median MiB": ("startup", "rss_median_mib"),
}


def dig(results: dict[str, Any], *keys: str) -> Any:
    """results[k1][k2]...; None where a section failed or a figure was not taken."""
    node: Any = results
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _target(name: str, value: Any, goal: str, ok: Callable[[float], bool]) -> Target:
    if not isinstance(value, int | float):
        return Target(name, None, goal, False)
    return Target(name, float(value), goal, ok(value))


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The figures a later run prints next to its own, and when and where they were taken."""
    setup = results.get("setup", {})
    figures = {label: dig(results, *path) for label, path in HEADLINE.items()}
    return {"at": setup.get("at", "?"), "commit": setup.get("commit", "?"), "figures": figures}


def targets(results: dict[str, Any]) -> list[Target]:
    ratios = dig(results, "throughput", "ratios", HEADLINE_CONCURRENCY) or {}
    coalesce = results.get("coalesce", {})
    spawns = coalesce.get("spawns") if coalesce.get("leases") == coalesce.get("routes") else None
    routes = results["setup"]["cold_routes"]
    c = HEADLINE_CONCURRENCY
    return [
        _target(
            f"route/empty @ c{c}",
            ratios.get("route_over_empty"),
            f">= {ROUTE_OVER_EMPTY}",
            lambda v: v >= ROUTE_OVER_EMPTY,
        ),
        _target(
            f"daemon CPU/pair route/empty @ c{c}",
            ratios.get("cpu_route_over_empty"),
            f"<= {CPU_ROUTE_OVER_EMPTY}",
            lambda v: v <= CPU_ROUTE_OVER_EMPTY,
        ),
        _target(
            f"RouteStream/empty pairs/s @ c{c}",
            ratios.get("stream_over_empty"),
            f">= {STREAM_OVER_EMPTY}",
            lambda v: v >= STREAM_OVER_EMPTY,
        ),
        _target(
            f"modeld/reference @ c{c}",
            ratios.get("modeld_over_reference"),
            f">= {MODELD_OVER_REFERENCE}",
            lambda v: v >= MODELD_OVER_REFERENCE,
        ),
        _target(
            "cold-start overhead, median ms",
            dig(results, "cold_start", "overhead_median_ms"),
            "< 25",
            lambda v: v < 25,
        ),
        _target(
            f"spawns for {routes} cold Routes (all leased)",
            spawns,
            "== 1",
            lambda v: v == 1,
        ),
        _target(
            "start -> SERVING, median ms",
            dig(results, "startup", "serving_median_ms"),
            f"<= {SERVING_MS:g}",
            lambda v: v <= SERVING_MS,
        ),
        _target(
            "idle RSS, median MiB",
            dig(results, "startup", "rss_median_mib"),
            f"<= {IDLE_RSS_MIB:g}",
            lambda v: v <= IDLE_RSS_MIB,
        ),
    ]


def _load(section: dict[str, Any]) -> list[str]:
    return [f"{section['replicas']} READY replicas in {section['ms']:.0f} ms"]


def _throughput(section: dict[str, Any]) -> list[str]:
    lines = [
        f"{'conc':>5}  {'workload':<10}{'pairs/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/pair':>13}"
    ]
    for s in section["series"]:
        cpu = s.get("daemon_cpu_us_per_pair")
        lines.append(
            f"{s['concurrency']:>5}  {s['kind']:<10}{s['pairs_per_s']:>10.1f}"
            f"{s['p50_ms']:>9.3f}{s['p99_ms']:>9.3f}{_figure(cpu, '.0f'):>13}"
        )
    lines += [
        "(CPU us/pair: the serving process's user+system time per pair, from /proc)",
        "",
        f"{'conc':>5}  {'route/empty':>12}{'CPU route/empty':>17}{'stream/empty':>14}"
        f"{'modeld/reference':>18}",
    ]
    for conc, r in section["ratios"].items():
        lines.append(
            f"{conc:>5}  {r['route_over_empty']:>12.3f}"
            f"{_figure(r.get('cpu_route_over_empty'), '.3f'):>17}"
            f"{_figure(r.get('stream_over_empty'), '.3f'):>14}"
            f"{r['modeld_over_reference']:>18.3f}"
        )
    lines.append(
        f"in-flight left on the daemon's replicas afterwards: {section['in_flight_after']}"
    )
    return lines


def _figure(value: Any, spec: str) -> str:
    return "-" if not isinstance(value, int | float) else format(value, spec)


def _startup(section: dict[str, Any]) -> list[str]:
    runs = ", ".join(f"{r['serving_ms']:.0f}" for r in section["runs"])
    rss = ", ".join(f"{r['rss_mib']:.1f}" for r in section["runs"])
    return [
        f"spawn -> health SERVING: median {section['serving_median_ms']:.0f} ms, "
        f"min {section['serving_min_ms']:.0f} ms (runs: {runs})",
        f"idle RSS: median {section['rss_median_mib']:.1f} MiB (runs: {rss})",
    ]


def _previous(results: dict[str, Any]) -> list[str]:
    now = headline(results)
    last = results.get("previous")
    when = f"{last['at']} ({last['commit']})" if last else "none"
    lines = [f"\nThis run against the previous one (previous: {when})"]
    lines.append(f"  {'figure':<30}{'previous':>10}{'now':>10}")
    for label, value in now["figures"].items():
        before = last["figures"].get(label) if last else None
        lines.append(f"  {label:<30}{_figure(before, '.3g'):>10}{_figure(value, '.3g'):>10}")
    return lines


def _cold(section: dict[str, Any]) -> list[str]:
    runs = ", ".join(f"{r['overhead_ms']:.1f}" for r in section["runs"])
    warm = sum(not r["cold_start_flag"] for r in section["runs"])
    return [
        *([f"WARNING: {warm} Route(s) were not flagged cold_start"] if warm else []),
        f"Route -> lease, median {section['total_median_ms']:.1f} ms; the backend's own "
        f"spawn->listening + LoadModel, median {section['backend_median_ms']:.1f} ms",
        f"daemon overhead: median {section['overhead_median_ms']:.1f} ms, "
        f"min {section['overhead_min_ms']:.1f} ms (runs: {runs})",
        "(the backend dates its start from /proc in clock ticks, so a run may be off by 10 ms)",
    ]


def _coalesce(section: dict[str, Any]) -> list[str]:
    lines = [
        f"{section['leases']}/{section['routes']} leased in {section['all_leased_ms']:.1f} ms; "
        f"spawns seen {section['spawns']}, replicas leased {section['replicas_leased']}, "
        f"live replicas {section['live_replicas']}"
    ]
    if section["errors"]:
        lines.append(f"{section['errors']} Routes failed, first: {section['first_error']}")
    return lines


def _section(results: dict[str, Any], key: str, title: str, body: Any) -> list[str]:
    section = results.get(key)
    if section is None:
        return [f"\n{title}\n  not measured"]
    if "error" in section:
        return [f"\n{title}\n  ERROR: {section['error']}"]
    return [f"\n{title}", *(f"  {line}" if line else "" for line in body(section))]


def render(results: dict[str, Any], checks: list[Target]) -> str:
    setup = results["setup"]
    lines = [
        f"modeld route benchmark: {setup['cpus']} CPUs, Python {setup['python']}, "
        f"grpcio {setup['grpcio']}, {setup['seconds_per_figure']} s per figure "
        f"in {setup['slices']} alternating slices, measured in {setup.get('measured_s', '?')} s"
    ]
    lines += _section(results, "load", f"Load {setup['model']}", _load)
    lines += _section(
        results,
        "throughput",
        "1-2. Route+Release vs empty pair (2 grpc.health.v1 Checks, same daemon) vs "
        "the pair on RouteStreams (one per worker) vs reference (SQLite txn per call)",
        _throughput,
    )
    lines += _section(results, "cold_start", f"3. Cold start ({setup['model']})", _cold)
    lines += _section(results, "coalesce", "4. Concurrent Routes on a cold model", _coalesce)
    lines += _section(results, "latency", "5. Latency figures (tests assert order)", latency_lines)
    lines += _section(results, "startup", "6. Daemon start and idle memory", _startup)
    lines += _previous(results)
    return "\n".join(lines + targets_table(checks, 44))
