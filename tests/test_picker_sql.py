"""The two forms of the routing policy agree: the pure picker and PICK_SQL over the registry.

Random replica sets go into a real registry file exactly as the router's flush
writes them (policy.picker.counter_row through Registry.flush_counters); the SQL
pick must name the replica the pure picker chooses from the same views.
"""

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiosqlite
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from modeld.policy.picker import counter_row, pick_replica
from modeld.policy.view import ReplicaView
from modeld.state import ReplicaState
from modeld.storage.registry import Registry, ReplicaRow

MODEL = "m"
DEVICES: tuple[int | None, ...] = (None, 0, 1, 2)
# Monotonic times near each other, some closer than a wall-clock double can tell apart.
BASES = (5_000.123456, 86_400.5)
NUDGES = (0.0, 1e-9, 1e-7, 2.4e-7, 4.9e-7, 5e-7, 5.1e-7, 1e-6, 1e-3)


@dataclass
class Db:
    loop: asyncio.AbstractEventLoop
    registry: Registry

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Db]:
    loop = asyncio.new_event_loop()
    path = Path(tmp_path_factory.mktemp("picker")) / "modeld.db"
    registry = loop.run_until_complete(Registry.open(path))
    try:
        yield Db(loop, registry)
    finally:
        loop.run_until_complete(registry.close())
        loop.close()


def view(
    rid: str, state: ReplicaState, in_flight: int, last_used: float, device: int | None
) -> ReplicaView:
    return ReplicaView(
        id=rid,
        model=MODEL,
        state=state,
        in_flight=in_flight,
        last_used=last_used,
        idle_since=None,
        oldest_lease_started=None,
        gpu_ids=() if device is None else (device, 3),
        memory=0,
        pinned=False,
        groups=(),
        idle_ttl=None,
        busy_timeout=None,
    )


times = st.builds(lambda b, n: b + n, st.sampled_from(BASES), st.sampled_from(NUDGES))
views = st.lists(
    st.builds(
        view,
        # Upper case, digits and non-ASCII: SQLite compares UTF-8 bytes, Python code points.
        rid=st.text("abAB09éß€", min_size=1, max_size=4),
        state=st.just(ReplicaState.READY) | st.sampled_from(list(ReplicaState)),
        in_flight=st.integers(0, 1) | st.integers(0, 1 << 40),
        last_used=times,
        device=st.sampled_from(DEVICES),
    ),
    max_size=8,
    unique_by=lambda v: v.id,
)
free_maps = st.dictionaries(
    st.sampled_from(DEVICES), st.sampled_from([0, 1, 1 << 30, (1 << 30) + 1, 1 << 62]), max_size=4
)
# Wall minus monotonic on real hosts: an epoch time minus an uptime.
offsets = st.floats(1.0e9, 2.1e9) | st.sampled_from([1_700_000_000.0, 1_699_999_999.9999995])


async def store(registry: Registry, replicas: list[ReplicaView]) -> None:
    """The table holds exactly these replicas plus look-alikes the pick must ignore."""
    rows = [ReplicaRow(id=v.id, model=MODEL, backend="echo", state=v.state.value) for v in replicas]
    rows += [
        ReplicaRow(id="!other-model", model="other", backend="echo", state="READY"),
        ReplicaRow(id="!other-node", model=MODEL, backend="echo", state="READY", node_id="n2"),
    ]

    async def job(conn: aiosqlite.Connection) -> None:
        await conn.execute("DELETE FROM replicas")
        await conn.executemany(
            "INSERT INTO replicas (id, model, backend, state, node_id) VALUES (?, ?, ?, ?, ?)",
            [(r.id, r.model, r.backend, r.state, r.node_id) for r in rows],
        )

    await registry.write(job)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(replicas=views, free=free_maps, offset=offsets)
@example(
    # Two replicas 1e-7 s apart in monotonic time: one wall-clock double apart at most.
    replicas=[
        view("b", ReplicaState.READY, 0, 5_000.0000001, 0),
        view("a", ReplicaState.READY, 0, 5_000.0, 1),
    ],
    free={0: 1, 1: 0},
    offset=1_700_000_000.0,
)
def test_sql_pick_equals_pure_pick(
    db: Db, replicas: list[ReplicaView], free: dict[int | None, int], offset: float
) -> None:
    db.run(store(db.registry, replicas))
    db.run(db.registry.flush_counters([counter_row(v, free, offset) for v in replicas]))
    chosen = pick_replica(replicas, free)
    assert db.run(db.registry.pick_replica(MODEL)) == (chosen.id if chosen else None)
    stored = db.run(db.registry.query("SELECT count(*) FROM replicas WHERE model = ?", (MODEL,)))
    assert stored[0][0] == len(replicas) + 1
