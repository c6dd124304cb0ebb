"""The chaos soak's short variant (`make soak` runs the long one): bench/soak.py for
30 seconds of client load and injected faults; every one of its checks must pass."""

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"
DURATION_S = 30


def test_short_chaos_soak_passes_every_check(tmp_path: Path) -> None:
    figures = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, str(SOAK), "--duration", str(DURATION_S), "--json", str(figures)],
        capture_output=True,
        text=True,
        timeout=DURATION_S + 80,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(figures.read_text())
    assert result["passed"] and not result["failures"]
    assert set(result["routes"]) <= {
        "OK",
        "UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "RESOURCE_EXHAUSTED",
        "CANCELLED",
    }
    assert result["requests_served"] > 0
    assert sum(result["faults_injected"].values()) > 0
    # in_flight is clamped at zero by the daemon, so its minimum proves nothing; the
    # soak's own checks (in `failures`) compare in_flight with the live leases.
    assert result["replicas_started"] > 0 and result["backend_pids_seen"] > 0
    print("\n" + run.stdout)
