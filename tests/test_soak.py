"""The chaos soak: its short variant (`make soak` runs the long one), bench/soak.py for
30 seconds of client load and injected faults, must pass every check; and its
in-flight == live leases check must be able to fail (a fake daemon that reports a
mismatch makes the soak fail)."""

import argparse
import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from modeld._proto.modeld.v1 import modeld_pb2 as pb

BENCH = Path(__file__).resolve().parent.parent / "bench"
SOAK = BENCH / "soak.py"
DURATION_S = 30


def load_soak() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("soak_under_test", SOAK)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def replica(rid: str, in_flight: int, live_leases: int) -> pb.Replica:
    return pb.Replica(id=rid, state=pb.READY, in_flight=in_flight, live_leases=live_leases)


def test_the_lease_check_fails_on_a_mismatch_and_passes_on_equality() -> None:
    soak = load_soak()
    tally = soak.Tally()
    tally.check_leases([replica("r1", 2, 2), replica("r2", 0, 0)], "sample")
    assert tally.failures == [] and tally.lease_mismatches == 0
    tally.check_leases([replica("r1", 2, 1)], "end")
    assert tally.lease_mismatches == 1
    assert tally.failures == ["end: replica r1 (READY) has in_flight 2 but 1 live leases"]
    assert (tally.lease_samples, tally.lease_readings, tally.max_in_flight) == (2, 3, 2)


class FakeStub:
    """A daemon whose ListReplicas reports one replica with a lease the table lacks;
    it ends the soak's sampling after `replies` answers."""

    def __init__(self, stop: asyncio.Event, replies: int) -> None:
        self._stop = stop
        self._left = replies

    async def ListReplicas(self, request: pb.ListReplicasRequest) -> pb.ListReplicasResponse:
        self._left -= 1
        if self._left == 0:
            self._stop.set()
        return pb.ListReplicasResponse(replicas=[replica("r1", 1, 0), replica("r2", 3, 3)])


def test_every_sample_is_checked_and_a_mismatch_fails_the_soak(tmp_path: Path) -> None:
    soak = load_soak()

    async def sample() -> Any:
        class FakeSoak(soak.Soak):  # type: ignore[name-defined,misc]
            @property
            def stub(self) -> FakeStub:
                return fake

        run = FakeSoak(argparse.Namespace(seed=1, duration=1.0, clients=0), tmp_path)
        fake = FakeStub(run.stop, replies=3)
        await asyncio.wait_for(run.sampler(), 30)
        return run

    run = asyncio.run(sample())
    figures = soak.figures(run.tally, run.args)
    assert run.tally.lease_samples == 3 and figures["lease_mismatches"] == 3
    assert not figures["passed"]
    assert figures["failures"][0] == "sample: replica r1 (READY) has in_flight 1 but 0 live leases"


@pytest.mark.long
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
    assert result["replicas_started"] > 0 and result["backend_pids_seen"] > 0
    # The lease check ran on live traffic (samples with leases held), not on an idle pool.
    assert result["lease_mismatches"] == 0
    assert result["lease_samples"] > 10 and result["max_in_flight_seen"] > 0
    print("\n" + run.stdout)
