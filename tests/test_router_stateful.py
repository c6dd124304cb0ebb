"""A hypothesis state machine drives the routing core in-process.

Random Route / Release / Load / Unload / lease expiry / crash / settings change /
shutdown, over test replicas that take time to start and to stop (their gates
are opened by rules too) and real admission over fixed readings. After every
step it checks:
- in-flight equals live leases, per replica (and the slot holders are the lease ids);
- never more replicas planned than max_replicas;
- nothing created after close began;
- no lease granted on a replica that was not READY or was being stopped;
- at the end, with every gate open, every waiter is answered.

`make test` runs >= 2,000 steps; `ROUTER_STATEFUL_EXAMPLES=2000` (what `make soak`
sets) runs >= 50,000.
"""

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from modeld.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from modeld.routing.leases import Lease
from modeld.spec import ModelSpec, Settings
from modeld.state import LIVE, ReplicaState
from routing_fakes import Harness, router_harness
from watchdog_fakes import StubReader, host

S = ReplicaState
SPECS = {
    "a": ModelSpec(name="a", backend="echo", max_replicas=2, parallel=2),
    "b": ModelSpec(name="b", backend="echo", max_replicas=1),
    "c": ModelSpec(name="c", backend="echo", max_replicas=3, min_replicas=1),
}
MODELS = sorted(SPECS)
ANSWERS = (Unavailable, DeadlineExceeded, ResourceExhausted, FailedPrecondition, NotFound)
EXAMPLES = int(os.environ.get("ROUTER_STATEFUL_EXAMPLES", "100"))
STEPS = 25
STEPS_TAKEN: list[int] = [0]


class RouterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = tempfile.TemporaryDirectory()
        self.start_gates: list[asyncio.Event] = []
        self.stop_gates: list[asyncio.Event] = []
        self.waiters: list[asyncio.Future[Any]] = []
        self.leases: list[Lease] = []
        self.closing_made: int | None = None
        self.closed = False
        self.cm = router_harness(
            Path(self.tmp.name),
            *SPECS.values(),
            settings=Settings(lease_ttl=5, max_loaded=4),
            reader=StubReader(host()),
            max_leases_per_replica=6,
            max_leases=20,
        )
        self.h: Harness = self.run(self.cm.__aenter__())
        self.h.default_script = self._script

    # plumbing

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def call(self, fn: Any, *args: Any) -> Any:
        """A synchronous router call, made on the loop (it may create tasks)."""

        async def on_loop() -> Any:
            return fn(*args)

        return self.run(on_loop())

    def _script(self) -> dict[str, Any]:
        start, stop = asyncio.Event(), asyncio.Event()
        self.start_gates.append(start)
        self.stop_gates.append(stop)
        if self.closed:
            stop.set()
        return {"gate": start, "stop_gate": stop}

    def background(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self.waiters.append(task)
        task.add_done_callback(self._collect)

    def _collect(self, task: "asyncio.Future[Any]") -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            assert isinstance(exc, ANSWERS), f"unexpected {type(exc).__name__}: {exc}"
        elif isinstance(task.result(), Lease):
            self.leases.append(task.result())

    def settle(self, n: int = 8) -> None:
        async def turns() -> None:
            for _ in range(n):
                await asyncio.sleep(0)

        self.run(turns())
        STEPS_TAKEN[0] += 1

    def deadline(self) -> float:
        return self.h.clock.monotonic() + 30.0

    # rules

    @rule(model=st.sampled_from(MODELS))
    def route(self, model: str) -> None:
        self.background(self.h.router.route(model, self.deadline()))
        self.settle()

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), unreachable=st.booleans())
    def release(self, data: st.DataObject, unreachable: bool) -> None:
        lease = data.draw(st.sampled_from(self.leases))
        self.leases.remove(lease)
        outcome = "BACKEND_UNREACHABLE" if unreachable else "OK"
        held = self.h.router.leases.holds(lease.id)
        assert self.call(self.h.router.release, lease.id, outcome) is held
        assert self.call(self.h.router.release, lease.id, "OK") is False
        self.settle()

    @rule(model=st.sampled_from(MODELS), n=st.integers(1, 3))
    def load(self, model: str, n: int) -> None:
        self.background(self.h.router.load(model, n, self.deadline()))
        self.settle()

    @rule(model=st.sampled_from(MODELS), force=st.booleans())
    def unload(self, model: str, force: bool) -> None:
        self.background(self.h.router.unload_model(model, force, 5.0))
        self.settle()

    @rule(seconds=st.sampled_from([0.5, 2.0, 5.0]))
    def time_passes(self, seconds: float) -> None:
        self.h.clock.advance(seconds)
        self.call(self.h.router.expire_leases)
        self.settle()

    @precondition(lambda self: any(r.state is S.READY for r in self.h.made))
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        ready = [r for r in self.h.made if r.state is S.READY]
        # On the loop, as in the daemon: what a crash sets off may begin a start.
        self.call(data.draw(st.sampled_from(ready)).crash)
        self.settle()

    @rule(max_loaded=st.sampled_from([0, 1, 2, 4]))
    def change_settings(self, max_loaded: int) -> None:
        self.run(self.h.settings.update({"max_loaded": max_loaded}))
        self.settle()

    @rule()
    def maintain(self) -> None:
        self.call(self.h.router.maintain)
        self.settle()

    @precondition(lambda self: any(not g.is_set() for g in self.start_gates))
    @rule(data=st.data())
    def a_start_finishes(self, data: st.DataObject) -> None:
        data.draw(st.sampled_from([g for g in self.start_gates if not g.is_set()])).set()
        self.settle()

    @precondition(lambda self: any(not g.is_set() for g in self.stop_gates))
    @rule(data=st.data())
    def a_stop_finishes(self, data: st.DataObject) -> None:
        data.draw(st.sampled_from([g for g in self.stop_gates if not g.is_set()])).set()
        self.settle()

    @rule(hold=st.booleans())
    def admission_gate(self, hold: bool) -> None:
        if hold and not self.closed:
            self.h.admit_gate = asyncio.Event()
        elif self.h.admit_gate is not None:
            self.h.admit_gate.set()
        self.settle()

    @precondition(lambda self: not self.closed)
    @rule()
    def shutdown(self) -> None:
        self.closed = True
        self.closing_made = len(self.h.made)
        for gate in self.stop_gates:
            gate.set()
        self.background(self.h.router.close())
        self.settle()

    # invariants

    @invariant()
    def in_flight_is_live_leases(self) -> None:
        by_replica = self.h.router.leases_by_replica()
        for replica in self.h.made:
            assert replica.in_flight == by_replica.get(replica.id, 0), replica.id
        for replica in self.h.made:
            assert all(self.h.router.leases.holds(h) for h in replica.slots.holders())

    @invariant()
    def never_more_planned_than_max_replicas(self) -> None:
        for model, spec in SPECS.items():
            pool = self.h.router.index.existing(model)
            if pool is not None:
                assert pool.planned() <= spec.max_replicas, (model, pool.planned())

    @invariant()
    def nothing_created_after_close(self) -> None:
        if self.closing_made is not None:
            assert len(self.h.made) == self.closing_made

    @invariant()
    def leases_only_on_ready_replicas_not_stopping(self) -> None:
        for replica in self.h.made:
            assert all(g == (S.READY, False) for g in replica.granted_in), replica.granted_in

    def teardown(self) -> None:
        try:
            self._answer_everyone()
        finally:
            self.run(self.cm.__aexit__(None, None, None))
            self.loop.close()
            self.tmp.cleanup()

    def _answer_everyone(self) -> None:
        if self.h.admit_gate is not None:
            self.h.admit_gate.set()
        self.closed = True
        # Count what exists once close has begun (its first turn shuts the gate): a start
        # admitted before that, by the gate released above, is not a start after close.
        self.background(self.h.router.close())
        self.settle(1)
        self.closing_made = len(self.h.made) if self.closing_made is None else self.closing_made
        for gate in self.start_gates + self.stop_gates:
            gate.set()
        for lease in self.leases:
            self.call(self.h.router.release, lease.id, "OK")
        pending = [w for w in self.waiters if not w.done()]
        if pending:
            _, still = self.run(asyncio.wait(pending, timeout=10))
            assert not still, f"{len(still)} waiters were never answered"
        self.nothing_created_after_close()
        for replica in self.h.made:
            assert replica.state not in LIVE, (replica.id, replica.state)


def test_the_router_keeps_its_invariants_under_random_operations() -> None:
    STEPS_TAKEN[0] = 0
    run_state_machine_as_test(
        RouterMachine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        ),
    )
    print(f"stateful router steps: {STEPS_TAKEN[0]}")
    assert STEPS_TAKEN[0] >= EXAMPLES * 20, STEPS_TAKEN[0]
