"""Figures for "no orphans": time from `kill -9` of modeld to its backends' last descendant gone.

    .venv/bin/python bench/orphans_bench.py [--rounds 3]

For each containment mechanism this host allows (cgroup, marker), two replicas of
tests/spawny_backend.py (a child, a grandchild, a double-forked setsid() worker
that ignores SIGTERM: 5 processes each) are loaded, then:
- `sentinel`: modeld gets SIGKILL; the clock runs until the last of the 10 pids exits;
- `restart`: the sentinel and modeld get SIGKILL, modeld is started again; the clock
  runs from the kill until the last pid exits, and until the new modeld serves.
Writes bench/results/orphans_bench.json and prints a table. Before this change,
both figures were "never": the setsid() workers outlived modeld and its restart.
"""

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from daemon_proc import start_daemon, wait_pids_gone, write_config  # noqa: E402
from modeld.errors import ConfigError  # noqa: E402
from modeld.supervisor.containment import choose  # noqa: E402
from test_orphans_e2e import body, every_pid, load  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "orphans_bench.json"
LIMIT_S = 60.0


async def one_round(work: Path, mechanism: str, path: str) -> dict[str, float]:
    spawn_dir = work / "spawned"
    config, addr = write_config(work, body(mechanism, spawn_dir))
    d = await start_daemon(config, addr)
    try:
        pids = every_pid(await load(d, spawn_dir, 2))
        sentinel = await d.wait_log(lambda e: e.get("event") == "containment")
        if path == "restart":
            os.kill(int(sentinel["sentinel_pid"]), signal.SIGKILL)
        killed = time.monotonic()
        d.proc.kill()
        await d.proc.wait()
    finally:
        await d.close()
    out: dict[str, float] = {}
    if path == "sentinel":
        left = await wait_pids_gone(pids, LIMIT_S)
        out["gone_s"] = time.monotonic() - killed
        assert not left, f"survivors {left}"
        return out
    gone = asyncio.ensure_future(wait_pids_gone(pids, LIMIT_S))
    gone_at: list[float] = []
    gone.add_done_callback(lambda _: gone_at.append(time.monotonic()))
    again = await start_daemon(config, addr)
    out["serving_s"] = time.monotonic() - killed
    try:
        assert not await gone, "survivors after the restart"
        out["gone_s"] = gone_at[0] - killed
        await again.stop()
    finally:
        await again.close()
    return out


async def run(rounds: int) -> dict[str, Any]:
    mechanisms = ["marker"]
    with contextlib.suppress(ConfigError):
        choose(Path(tempfile.gettempdir()) / "modeld-bench-check", "cgroup").close()
        mechanisms.insert(0, "cgroup")
    figures: dict[str, Any] = {}
    for mechanism in mechanisms:
        for path in ("sentinel", "restart"):
            samples = []
            for _ in range(rounds):
                with tempfile.TemporaryDirectory(prefix="modeld-orphans-") as tmp:
                    samples.append(await one_round(Path(tmp), mechanism, path))
            gone = [s["gone_s"] for s in samples]
            entry = {"gone_median_s": statistics.median(gone), "gone_max_s": max(gone)}
            if path == "restart":
                entry["serving_median_s"] = statistics.median(s["serving_s"] for s in samples)
            figures[f"{mechanism}/{path}"] = entry
    return {"rounds": rounds, "cpus": os.cpu_count(), "figures": figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = asyncio.run(run(args.rounds))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(
        f"{'mechanism/path':<20} {'kill -9 → last gone':>22} {'(max)':>8} {'restart serving':>16}"
    )
    for name, f in result["figures"].items():
        serving = f"{f['serving_median_s']:.3f}s" if "serving_median_s" in f else "-"
        print(f"{name:<20} {f['gone_median_s']:>21.3f}s {f['gone_max_s']:>7.3f}s {serving:>16}")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
