"""The slot decisions (claims.free_slot) and the Router's slot gate, without a database."""

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from modeld.cluster.claims import LOADING, SERVING, Slot, free_slot
from modeld.errors import Unavailable
from modeld.spec import ModelSpec
from modeld.state import ReplicaState
from routing_fakes import router_harness

M = ModelSpec(name="m", backend="echo", max_replicas=2)


def test_free_slot_is_the_lowest_nothing_holds() -> None:
    assert free_slot([], 2) == 0
    held = Slot(0, 1, "a", SERVING, False, "READY")
    assert free_slot([held], 2) == 1
    assert free_slot([held, Slot(1, 2, "b", LOADING, True)], 2) is None
    # A serving slot whose replica is gone (its host's lease expired), or an expired
    # load, is free again.
    assert free_slot([Slot(0, 1, "a", SERVING, False, None)], 1) == 0
    assert free_slot([held, Slot(1, 2, "b", LOADING, False)], 2) == 1
    # Rows beyond max_replicas (it was lowered) hold nothing below it.
    assert free_slot([Slot(3, 4, "a", SERVING, False, "READY")], 1) == 0


class Gate:
    def __init__(self) -> None:
        self.asked: list[str] = []
        self.called = asyncio.Event()

    def scale_up(self, spec: ModelSpec) -> None:
        self.asked.append(spec.name)
        self.called.set()


async def test_with_a_gate_scale_out_starts_nothing_here(tmp_path: Path) -> None:
    gate = Gate()
    async with router_harness(tmp_path, replace(M, parallel=1), gate=gate) as h:
        pool = h.router.pool("m")
        # The one replica a claimed Load would start (the gate refuses a Route's own start).
        await h.router.lifecycle.start(pool, replace(M, parallel=1), h.deadline())
        first = await h.router.route("m", h.deadline())
        second = asyncio.ensure_future(h.router.route("m", h.deadline()))
        await asyncio.wait_for(gate.called.wait(), 5)
        assert gate.asked == ["m"]
        assert pool.pending() == 0
        assert len(h.made) == 1
        h.router.release(first.id, "OK")
        assert (await second).replica_id == first.replica_id


async def test_with_a_gate_a_route_never_starts_a_replica_here(tmp_path: Path) -> None:
    async with router_harness(tmp_path, M, gate=Gate()) as h:
        with pytest.raises(Unavailable, match="retry the Route"):
            await h.router.route("m", h.deadline())
        assert not h.made
        # A start already under way (a claimed Load) is joined, not refused.
        pool = h.router.pool("m")
        start = h.router.lifecycle.start(pool, M, h.deadline())
        lease = await h.router.route("m", h.deadline())
        assert (await start).id == lease.replica_id
        assert pool.replicas[lease.replica_id].state is ReplicaState.READY
