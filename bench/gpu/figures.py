"""The pure half of gpu_check.py: judging measurements, printing figures and the summary.

Nothing here touches a GPU, a process or the clock, so tests/test_gpu_check.py runs
it anywhere. Each check gives one `Figure`: a name, the measured values, pass/fail
and a line that says why.
"""

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

MIB = 1 << 20
GIB = 1 << 30
# modeld's view must agree with NVML within this fraction (issue 16, figure 1).
AGREE_FRACTION = 0.05
# How far from the baseline "returned to baseline" may be: CUDA's bookkeeping wobbles.
BASELINE_SLACK = 512 * MIB
CONTEXT_ALLOWANCE = GIB
# /proc gives a process's start in clock ticks (10 ms), so that mark may be a tick early.
MARK_SLACK_S = 0.02


@dataclass
class Figure:
    number: int
    name: str
    passed: bool
    detail: str
    values: dict[str, Any] = field(default_factory=dict)


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / MIB:.0f} MiB"


def within(measured: float, expected: float, fraction: float) -> bool:
    """|measured - expected| <= fraction * |expected| (an expected 0 needs an exact 0)."""
    return abs(measured - expected) <= fraction * abs(expected)


def uuid_key(uuid: str) -> str:
    """NVML says 'GPU-xxxxxxxx-...', PyTorch often drops the 'GPU-' prefix."""
    text = uuid.strip().lower()
    return text.removeprefix("gpu-")


def memory_figure(
    *, alloc: int, nvml_drop: int, modeld_memory: int, estimate: int, backend_free_drop: int
) -> Figure:
    """Figure 1: NVML's fall in free memory vs the allocation, and modeld's view vs NVML."""
    measured = modeld_memory != estimate
    overhead = nvml_drop - alloc
    # The allocation plus one CUDA context, which is not part of what was asked for.
    drop_ok = alloc <= nvml_drop <= alloc + max(AGREE_FRACTION * alloc, CONTEXT_ALLOWANCE)
    view_ok = measured and within(modeld_memory, nvml_drop, AGREE_FRACTION)
    if not measured:
        why = "modeld shows the spec's memory_estimate: it has no per-process reading"
    elif not view_ok:
        why = f"modeld shows {fmt_bytes(modeld_memory)}, NVML {fmt_bytes(nvml_drop)}"
    elif not drop_ok:
        why = f"NVML fell by {fmt_bytes(nvml_drop)} for {fmt_bytes(alloc)} allocated"
    else:
        why = (
            f"NVML fell by {fmt_bytes(nvml_drop)} for {fmt_bytes(alloc)} allocated "
            f"(+{fmt_bytes(overhead)} CUDA context); modeld shows {fmt_bytes(modeld_memory)}"
        )
    return Figure(
        1,
        "memory: NVML fall vs allocation, modeld view vs NVML",
        drop_ok and view_ok,
        why,
        {
            "alloc_bytes": alloc,
            "nvml_free_drop_bytes": nvml_drop,
            "context_overhead_bytes": overhead,
            "modeld_memory_bytes": modeld_memory,
            "modeld_memory_is_measured": measured,
            "modeld_vs_nvml_fraction": _ratio(modeld_memory - nvml_drop, nvml_drop),
            "backend_seen_free_drop_bytes": backend_free_drop,
        },
    )


def placement_figure(
    *,
    modeld_gpu: str,
    report: Mapping[str, Any],
    nvml_uuids: Sequence[str],
    nvml_pci: Sequence[str] = (),
) -> Figure:
    """Figure 2: the backend sees exactly the GPU(s) modeld placed it on, in PCI bus order."""
    ids = [int(i) for i in modeld_gpu.split(",") if i.strip()]
    problems = []
    if not ids:
        problems.append("modeld placed the replica on no GPU")
    if report.get("cuda_visible_devices") != modeld_gpu:
        seen = report.get("cuda_visible_devices")
        problems.append(f"CUDA_VISIBLE_DEVICES={seen!r}, modeld says {modeld_gpu!r}")
    if report.get("cuda_device_order") != "PCI_BUS_ID":
        problems.append(f"CUDA_DEVICE_ORDER={report.get('cuda_device_order')!r}")
    if report.get("device_count") != len(ids):
        problems.append(f"backend sees {report.get('device_count')} device(s), not {len(ids)}")
    expected = nvml_uuids[ids[0]] if ids and ids[0] < len(nvml_uuids) else ""
    if uuid_key(str(report.get("uuid", ""))) != uuid_key(expected):
        problems.append(f"backend's device 0 is {report.get('uuid')!r}, NVML's is {expected!r}")
    nvml_address = nvml_pci[ids[0]] if ids and ids[0] < len(nvml_pci) else ""
    backend_address = pci_key(str(report.get("pci") or ""))
    if backend_address is not None and backend_address != pci_key(nvml_address):
        problems.append(f"backend's PCI address is {report.get('pci')}, NVML's {nvml_address}")
    detail = "; ".join(problems) or (
        f"GPU {modeld_gpu}: CUDA_VISIBLE_DEVICES, device count 1, UUID {expected}"
        f"{' and PCI address ' + nvml_address if backend_address else ''} agree"
    )
    return Figure(
        2,
        "placement: backend sees the GPU modeld chose",
        not problems,
        detail,
        {
            "modeld_gpu": modeld_gpu,
            "cuda_visible_devices": report.get("cuda_visible_devices"),
            "cuda_device_order": report.get("cuda_device_order"),
            "backend_device_count": report.get("device_count"),
            "backend_uuid": report.get("uuid"),
            "nvml_uuid": expected,
            "backend_pci": report.get("pci"),
            "nvml_pci": nvml_address,
        },
    )


def pci_key(address: str) -> tuple[int, int, int] | None:
    """(domain, bus, device) of "dd:bb:dd" (the backend's, hex) or NVML's
    "DDDDDDDD:BB:DD.F"; None when it is not such an address."""
    parts = address.split(".", maxsplit=1)[0].split(":")
    try:
        numbers = tuple(int(p, 16) for p in parts)
    except ValueError:
        return None
    if len(numbers) != 3 or min(numbers) < 0:
        return None
    return numbers[0], numbers[1], numbers[2]


@dataclass(frozen=True)
class Step:
    """One step of a scripted scenario: what should have happened, and what did."""

    what: str
    passed: bool
    seen: str


def steps_figure(number: int, name: str, steps: Sequence[Step], **values: Any) -> Figure:
    failed = [s for s in steps if not s.passed]
    detail = "; ".join(f"{s.what}: {s.seen}" for s in failed) or f"{len(steps)} steps as expected"
    out = dict(values)
    out["steps"] = [asdict(s) for s in steps]
    return Figure(number, name, bool(steps) and not failed, detail, out)


def returned_to_baseline(baseline_used: int, used: int) -> bool:
    return used <= baseline_used + BASELINE_SLACK


# The marks a backend reports, in order, the name of the interval that ends at each, and
# whether it must be there (a backend without PyTorch imports none).
SPLIT = (
    ("proc_start", "spawn (admission, fork/exec)", True),
    ("import_start", "interpreter start", False),
    ("imports_done", "gRPC imports", False),
    ("torch_imported", "torch import", False),
    ("listening", "gRPC listen", True),
    ("load_begin", "readiness probe, LoadModel sent", True),
    ("cuda_ready", "CUDA init (context)", True),
    ("alloc_done", "allocation", True),
)


def cold_split(route_start: float, lease: float, marks: Mapping[str, float]) -> dict[str, float]:
    """Seconds per phase of a cold Route: each wall-clock mark minus the one before it."""
    out: dict[str, float] = {}
    before = route_start
    for key, label, required in SPLIT:
        at = marks.get(key, 0.0)
        if not at and not required:
            continue
        if not at:
            raise ValueError(f"the backend reported no {key!r} time")
        out[label] = at - before
        before = at
    out["ready, lease granted"] = lease - before
    return out


def timing_figure(route_start: float, lease: float, marks: Mapping[str, float]) -> Figure:
    """Figure 5: Route-to-lease for a cold replica, split; every phase must be >= 0."""
    total = lease - route_start
    try:
        split = cold_split(route_start, lease, marks)
    except ValueError as exc:
        return Figure(5, "cold start: Route to lease", False, str(exc), {"total_s": total})
    negative = [k for k, v in split.items() if v < -MARK_SLACK_S]
    detail = f"{total:.2f} s: " + ", ".join(f"{k} {v:.3f} s" for k, v in split.items())
    if negative:
        detail = f"clock marks out of order ({', '.join(negative)}): " + detail
    values = {"total_s": round(total, 4), "split_s": {k: round(v, 4) for k, v in split.items()}}
    return Figure(5, "cold start: Route to lease", not negative, detail, values)


def render(figures: Iterable[Figure]) -> str:
    lines = []
    for f in sorted(figures, key=lambda f: f.number):
        lines.append(f"[{'PASS' if f.passed else 'FAIL'}] {f.number}. {f.name}: {f.detail}")
    return "\n".join(lines)


def summary(figures: Sequence[Figure], context: Mapping[str, Any]) -> dict[str, Any]:
    """The machine-readable result: every figure, and passed only when all five passed."""
    numbers = {f.number for f in figures}
    return {
        "passed": numbers == {1, 2, 3, 4, 5} and all(f.passed for f in figures),
        "missing": sorted({1, 2, 3, 4, 5} - numbers),
        "figures": [asdict(f) for f in sorted(figures, key=lambda f: f.number)],
        "context": dict(context),
    }


def dumps(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str)


def _ratio(delta: float, base: float) -> float | None:
    return round(delta / base, 4) if base else None


def figure_list(result: Mapping[str, Any]) -> list[Figure]:
    """The figures of a summary, back as objects (to print them, or in tests)."""
    return [Figure(**f) for f in result["figures"]]
