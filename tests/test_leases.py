"""The lease table: expiry order, renewals, releases, the lazy heap and the per-replica index."""

from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from modeld.routing.leases import Lease, LeaseTable


@dataclass
class Holder:
    id: str
    released: int = 0

    def release(self) -> None:
        self.released += 1


def lease(lid: str, holder: Holder, started: float, ttl: float) -> Lease:
    return Lease(
        id=lid,
        replica=holder,
        model="m",
        address="a",
        protocol="grpc",
        started=started,
        expires=started + ttl,
        expires_wall=started + ttl + 1e9,
        ttl=ttl,
        cold_start=False,
    )


def test_expired_leases_come_out_in_order_exactly_once() -> None:
    r = Holder("r")
    table = LeaseTable()
    for n, ttl in enumerate((3.0, 1.0, 2.0)):
        table.add(lease(f"l{n}", r, 0.0, ttl))
    assert table.next_expiry() == 1.0
    assert table.pop_expired(0.999) == []
    assert [x.id for x in table.pop_expired(2.0)] == ["l1", "l2"]
    assert [x.id for x in table.pop_expired(10.0)] == ["l0"]
    assert table.pop_expired(10.0) == []
    assert len(table) == 0


def test_a_released_or_renewed_lease_does_not_expire_at_its_old_time() -> None:
    r = Holder("r")
    table = LeaseTable()
    table.add(released := lease("gone", r, 0.0, 1.0))
    table.add(renewed := lease("kept", r, 0.0, 1.0))
    assert table.pop(released.id) is released
    assert table.pop(released.id) is None
    table.renew(renewed, now=0.9, wall=1e9 + 0.9)
    assert (renewed.expires, renewed.expires_wall) == (1.9, 1e9 + 1.9)
    assert table.pop_expired(1.5) == []
    assert table.pop_expired(1.9) == [renewed]


def test_per_replica_views() -> None:
    a, b = Holder("a"), Holder("b")
    table = LeaseTable()
    table.add(lease("1", a, 5.0, 10.0))
    table.add(lease("2", a, 3.0, 10.0))
    table.add(lease("3", b, 4.0, 10.0))
    assert sorted(x.id for x in table.of_replica("a")) == ["1", "2"]
    assert table.oldest_started() == {"a": 3.0, "b": 4.0}


def test_the_heap_stays_bounded_under_churn() -> None:
    r = Holder("r")
    table = LeaseTable()
    keep = lease("keep", r, 0.0, 1000.0)
    table.add(keep)
    for n in range(10_000):
        table.add(lease(f"x{n}", r, float(n), 600.0))
        table.renew(keep, now=float(n), wall=float(n))
        assert table.pop(f"x{n}") is not None
    assert len(table) == 1
    assert len(table._heap) <= 4 * 64
    assert table.pop_expired(20_000.0) == [keep]


# The per-replica index against a brute-force scan of every lease.

HOLDERS = [Holder(name) for name in "abc"]


class LeaseTableMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = LeaseTable()
        self.now = 0.0
        self.serial = 0

    live = Bundle("live")

    @rule(target=live, holder=st.sampled_from(HOLDERS), back=st.sampled_from([0.0, 0.0, 0.5, 3.0]))
    def add(self, holder: Holder, back: float) -> str:
        # Mostly now (as grant does), sometimes earlier: the table must sort those in.
        self.serial += 1
        lid = f"l{self.serial}"
        self.table.add(lease(lid, holder, self.now - back, 5.0))
        return lid

    @rule(lid=live)
    def release(self, lid: str) -> None:
        self.table.pop(lid)

    @rule(lid=live)
    def renew(self, lid: str) -> None:
        held = self.table.get(lid)
        if held is not None:
            self.table.renew(held, self.now, self.now + 1e9)

    @rule(seconds=st.sampled_from([0.0, 0.5, 1.0, 2.0]))
    def advance_and_expire(self, seconds: float) -> None:
        self.now += seconds
        self.table.pop_expired(self.now)

    @invariant()
    def agrees_with_a_scan(self) -> None:
        leases = list(self.table._leases.values())
        oldest: dict[str, float] = {}
        counts: dict[str, int] = {}
        for held in leases:
            rid = held.replica.id
            oldest[rid] = min(oldest.get(rid, held.started), held.started)
            counts[rid] = counts.get(rid, 0) + 1
        assert self.table.oldest_started() == oldest
        assert self.table.per_replica() == counts
        for holder in HOLDERS:
            expected = sorted(x.id for x in leases if x.replica.id == holder.id)
            assert sorted(x.id for x in self.table.of_replica(holder.id)) == expected


LeaseTableMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None
)
test_the_per_replica_index_agrees_with_a_scan = LeaseTableMachine.TestCase
