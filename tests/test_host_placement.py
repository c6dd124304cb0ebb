"""Host placement: eligibility, the documented order, refusals; the published figures."""

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modeld.api import convert
from modeld.capacity.resources import ResourceReader
from modeld.clock import FakeClock, SystemClock
from modeld.cluster.hostcap import GRID, LocalFigures, capacities, figures_of
from modeld.cluster.membership import Membership
from modeld.cluster.view import ClusterView, HostFigures, RemoteHost
from modeld.config import ClusterConfig
from modeld.errors import FailedPrecondition, InvalidArgument
from modeld.info import RemoteReplica
from modeld.ops.events import EventBus
from modeld.policy.host_placement import HostCapacity, eviction_rank, place, placement_mode
from modeld.policy.view import GpuView, HostView, ReplicaView
from modeld.spec import BackendSpec, ModelSpec, check_model_spec
from modeld.state import ReplicaState
from modeld.storage.registry import Registry

GIB = 1 << 30
SPEC = ModelSpec(name="m", backend="llama", memory_estimate=8 * GIB)


def host(host_id: str, **kw: object) -> HostCapacity:
    base = HostCapacity(
        host_id=host_id,
        role="node",
        backends=frozenset({"llama"}),
        gpu_free=(40 * GIB,),
        gpu_total=(80 * GIB,),
        ram_free=64 * GIB,
        ram_total=128 * GIB,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


FULL = {"gpu_free": (2 * GIB,)}  # 6 GiB short of the 8 GiB estimate

# (case, hosts, spec changes, mode, expected order)
ORDER_CASES = [
    (
        "room without eviction beats fewer replicas",
        [host("a", **FULL, evictable=40 * GIB), host("b", loaded=5)],
        {},
        "spread",
        ["b", "a"],
    ),
    (
        "max_loaded reached means eviction even with free memory",
        [host("a", loaded=2, max_loaded=2, evictable=GIB), host("b", loaded=3, max_loaded=4)],
        {},
        "spread",
        ["b", "a"],
    ),
    (
        "fewer loaded replicas among equals",
        [host("a", loaded=3), host("b", loaded=1), host("c", loaded=2)],
        {},
        "spread",
        ["b", "c", "a"],
    ),
    (
        "spread: fewer replicas of this model first",
        [
            host("a", loaded=1, model_replicas={"m": 1}),
            host("b", loaded=3, model_replicas={"other": 3}),
        ],
        {},
        "spread",
        ["b", "a"],
    ),
    (
        "binpack: more replicas of this model first",
        [
            host("a", loaded=1, model_replicas={"m": 1}),
            host("b", loaded=0),
        ],
        {},
        "binpack",
        ["a", "b"],
    ),
    (
        "eviction needed: least to evict first, then who cannot evict enough",
        [
            host("a", gpu_free=(GIB,), evictable=10 * GIB),
            host("b", gpu_free=(6 * GIB,), evictable=10 * GIB),
            host("c", gpu_free=(7 * GIB,), evictable=0),
        ],
        {},
        "spread",
        ["b", "a", "c"],
    ),
    (
        "host without GPUs is judged by RAM",
        [host("cpu", gpu_free=(), gpu_total=(), ram_free=16 * GIB), host("gpu", **FULL)],
        {},
        "spread",
        ["cpu", "gpu"],
    ),
    (
        "gpus = 0 puts the estimate in RAM even on a GPU host",
        [host("a", **FULL, ram_free=GIB), host("b", **FULL, ram_free=32 * GIB)],
        {"gpus": 0},
        "spread",
        ["b", "a"],
    ),
    (
        "the best GPU of a host counts",
        [host("a", gpu_free=(GIB, 9 * GIB), gpu_total=(80 * GIB, 80 * GIB)), host("b", **FULL)],
        {},
        "spread",
        ["a", "b"],
    ),
    (
        "a pinned main GPU counts alone",
        [host("a", gpu_free=(GIB, 9 * GIB), gpu_total=(80 * GIB, 80 * GIB)), host("b")],
        {"gpu_ids": (0,)},
        "spread",
        ["b", "a"],
    ),
    (
        "routers, other backends, unmatched labels and small devices are left out",
        [
            host("router", role="router"),
            host("other", backends=frozenset({"vllm"})),
            host("a100", labels={"gpu": "a100"}),
            host("small", labels={"gpu": "h100"}, gpu_total=(4 * GIB,), gpu_free=(4 * GIB,)),
            host("h100", labels={"gpu": "h100", "zone": "x"}),
        ],
        {"host_labels": (("gpu", "h100"),)},
        "spread",
        ["h100"],
    ),
    (
        "ties broken by host id",
        [host("b"), host("a")],
        {},
        "spread",
        ["a", "b"],
    ),
]


@pytest.mark.parametrize(
    ("hosts", "changes", "mode", "expected"),
    [case[1:] for case in ORDER_CASES],
    ids=[case[0] for case in ORDER_CASES],
)
def test_place_orders_as_documented(
    hosts: list[HostCapacity], changes: dict[str, object], mode: str, expected: list[str]
) -> None:
    assert place("m", replace(SPEC, **changes), hosts, mode=mode) == expected  # type: ignore[arg-type]


REFUSALS = [
    ("no hosts", [], {}, "no node host in the cluster"),
    ("routers only", [host("r", role="router")], {}, "hosts: r router"),
    (
        "no backend",
        [host("a", backends=frozenset({"vllm", "echo"})), host("b", backends=frozenset())],
        {},
        "no host has backend 'llama' (hosts: a [echo, vllm], b [])",
    ),
    (
        "labels",
        [host("a", labels={"gpu": "a100"}), host("b")],
        {"host_labels": (("gpu", "h100"),)},
        "labels {gpu=h100} matched no host with backend 'llama' "
        "(hosts' labels: a {gpu=a100}, b {})",
    ),
    (
        "memory",
        [host("a"), host("b", gpu_total=(24 * GIB,))],
        {"memory_estimate": 100 * GIB},
        "memory estimate 100.0 GiB is larger than any host's device (largest: 80.0 GiB on a)",
    ),
]


@pytest.mark.parametrize(
    ("hosts", "changes", "message"),
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
def test_no_eligible_host_says_why(
    hosts: list[HostCapacity], changes: dict[str, object], message: str
) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        place("m", replace(SPEC, **changes), hosts)  # type: ignore[arg-type]
    assert message in str(caught.value)


def test_the_spec_placement_wins_over_the_cluster_default() -> None:
    assert placement_mode(SPEC, "binpack") == "binpack"
    assert placement_mode(replace(SPEC, placement="spread"), "binpack") == "spread"


def test_unknown_device_total_does_not_exclude_a_host() -> None:
    bare = host("bare", gpu_free=(), gpu_total=(), ram_free=0, ram_total=0)
    assert place("m", SPEC, [bare]) == ["bare"]


def test_a_long_refusal_names_eight_hosts_and_counts_the_rest() -> None:
    hosts = [host(f"h{i:02}", backends=frozenset()) for i in range(11)]
    with pytest.raises(FailedPrecondition, match="h07 \\[\\] and 3 more"):
        place("m", SPEC, hosts)


hosts_st = st.lists(
    st.builds(
        HostCapacity,
        host_id=st.sampled_from("abcdefgh"),
        role=st.sampled_from(["node", "node", "router"]),
        labels=st.dictionaries(st.sampled_from(["gpu", "zone"]), st.sampled_from(["x", "y"])),
        backends=st.frozensets(st.sampled_from(["llama", "vllm"])),
        gpu_free=st.lists(st.integers(0, 16), max_size=3).map(lambda g: tuple(x * GIB for x in g)),
        gpu_total=st.lists(st.integers(0, 16), max_size=3).map(lambda g: tuple(x * GIB for x in g)),
        ram_free=st.integers(0, 16).map(lambda x: x * GIB),
        ram_total=st.integers(0, 32).map(lambda x: x * GIB),
        loaded=st.integers(0, 4),
        max_loaded=st.integers(0, 4),
        evictable=st.integers(0, 16).map(lambda x: x * GIB),
        model_replicas=st.dictionaries(st.just("m"), st.integers(0, 3)),
    ),
    max_size=8,
    unique_by=lambda h: h.host_id,
)


@given(
    hosts=hosts_st,
    estimate=st.integers(0, 20),
    labels=st.dictionaries(st.sampled_from(["gpu", "zone"]), st.sampled_from(["x", "y"])),
    mode=st.sampled_from(["spread", "binpack"]),
)
def test_result_is_eligible_and_no_eviction_hosts_come_first(
    hosts: list[HostCapacity], estimate: int, labels: dict[str, str], mode: str
) -> None:
    spec = replace(SPEC, memory_estimate=estimate * GIB, host_labels=tuple(sorted(labels.items())))
    by_id = {h.host_id: h for h in hosts}

    def fits(h: HostCapacity) -> bool:
        total = max(h.gpu_total) if h.gpu_total else h.ram_total
        return total == 0 or spec.memory_estimate <= total

    eligible = {
        h.host_id
        for h in hosts
        if h.role == "node"
        and "llama" in h.backends
        and all(h.labels.get(k) == v for k, v in labels.items())
        and fits(h)
    }
    try:
        order = place("m", spec, hosts, mode=mode)
    except FailedPrecondition:
        order = []
    # Exactly the eligible hosts, each once: none dropped for being busy or full.
    assert sorted(order) == sorted(eligible)
    tiers = [eviction_rank(by_id[i], spec)[0] for i in order]
    assert tiers == sorted(tiers)


# the published figures


def view(rid: str, **kw: object) -> ReplicaView:
    base = ReplicaView(
        id=rid,
        model="m",
        state=ReplicaState.READY,
        in_flight=0,
        last_used=0.0,
        idle_since=0.0,
        oldest_lease_started=None,
        gpu_ids=(0,),
        memory=GIB,
        pinned=False,
        groups=(),
        idle_ttl=None,
        busy_timeout=None,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_figures_are_on_the_grid_and_count_only_idle_unpinned_as_evictable() -> None:
    gpus = (
        GpuView(1, "u1", "g", 80 * GIB, 10 * GIB + 5),
        GpuView(0, "u0", "g", 24 * GIB, GRID + 1),
    )
    reading = HostView(ram_total=64 * GIB + 7, ram_available=32 * GIB + 3, gpus=gpus)
    replicas = [
        view("idle", memory=2 * GIB + 1),
        view("busy", in_flight=1, memory=4 * GIB),
        view("pinned", pinned=True, memory=4 * GIB),
        view("starting", state=ReplicaState.LOADING, memory=4 * GIB),
    ]
    figures = figures_of(["llama", "echo", "llama"], reading, replicas, max_loaded=6)
    assert figures.backends == ("echo", "llama")
    assert figures.gpu_total == (24 * GIB, 80 * GIB)
    assert figures.gpu_free == (24 * GIB - 2 * GRID, 70 * GIB - GRID)
    assert (figures.ram_total, figures.ram_free) == (64 * GIB, 32 * GIB)
    assert (figures.loaded, figures.max_loaded, figures.evictable) == (4, 6, 2 * GIB)
    # Noise below the grid is no change: the row is not rewritten for it.
    noisy = HostView(ram_total=64 * GIB + 9, ram_available=32 * GIB + 1000, gpus=gpus)
    assert figures_of(["echo", "llama"], noisy, replicas, max_loaded=6) == figures


class PublishedFigures:
    """A store that records what the membership writes to its host row."""

    def __init__(self) -> None:
        self.written: list[tuple[int, HostFigures]] = []

    async def publish_host(self, epoch: int, figures: HostFigures) -> None:
        self.written.append((epoch, figures))


async def test_membership_reads_capacity_once_a_second_and_writes_only_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    current = HostFigures(loaded=1)
    reads: list[float] = []

    async def figures() -> HostFigures:
        reads.append(clock.monotonic())
        return current

    cfg = ClusterConfig(dsn="postgresql://x/y", dsn_file="", host_id="a", advertise="a:1",
                        backend_host="a")  # fmt: skip
    member = Membership(cfg, cfg.dsn, clock, EventBus(), list, figures=figures)
    member.epoch = 7
    store = PublishedFigures()

    async def db(step: object) -> bool:
        assert callable(step)
        await step(store)
        return True

    monkeypatch.setattr(member, "_db", db)
    await member._publish_figures()
    await member._publish_figures()  # within the second: not even read
    clock.advance(1.0)
    await member._publish_figures()  # read, unchanged: not written
    current = HostFigures(loaded=2)
    await member._publish_figures()  # changed, but read less than a second ago
    clock.advance(1.0)
    await member._publish_figures()
    assert store.written == [(7, HostFigures(loaded=1)), (7, HostFigures(loaded=2))]
    assert len(reads) == 3


class Unreadable:
    def read(self) -> HostView:
        raise OSError("no such file")


async def test_unreadable_resources_publish_memory_as_unknown() -> None:
    reader: ResourceReader = Unreadable()  # type: ignore[assignment]
    local = LocalFigures(["echo"], reader, lambda: [view("r")], lambda: 4, SystemClock())
    figures = await local.read()
    assert (figures.backends, figures.gpu_total, figures.ram_total) == (("echo",), (), 0)
    assert (figures.loaded, figures.max_loaded, figures.evictable) == (1, 4, GIB)


def remote(host_id: str, epoch: int = 1, expires: float = 100.0, **kw: object) -> RemoteHost:
    figures = HostFigures(**kw)  # type: ignore[arg-type]
    return RemoteHost(host_id, epoch, f"{host_id}:1", "node", {"gpu": "h100"}, expires, figures)


def replica(rid: str, host_id: str, model: str = "m", epoch: int = 1) -> RemoteReplica:
    return RemoteReplica(rid, host_id, epoch, model, ReplicaState.READY, "x:1", 0, 0, 0.0, 0)


def test_capacities_are_the_live_hosts_with_their_replicas_counted() -> None:
    cluster = ClusterView("a")
    cluster.replace_all(
        [
            remote("a", backends=("llama",), gpu_free=(GIB,), gpu_total=(2 * GIB,), loaded=3),
            remote("b", expires=10.0, max_loaded=2, evictable=GIB, ram_total=GIB),
            remote("c", epoch=2),
        ],
        [
            replica("r1", "a"),
            replica("r2", "a"),
            replica("r3", "a", "other"),
            replica("r4", "b"),
            replica("old", "c", epoch=1),
        ],
    )
    live = capacities(cluster, 50.0, trust_expired=False)
    assert [c.host_id for c in live] == ["a", "c"]
    a, c = live
    assert a.backends == frozenset({"llama"}) and a.labels == {"gpu": "h100"}
    assert (a.gpu_free, a.gpu_total, a.loaded) == ((GIB,), (2 * GIB,), 3)
    assert a.model_replicas == {"m": 2, "other": 1}
    # An older epoch's leftovers are not the host's replicas.
    assert c.model_replicas == {}
    trusted = capacities(cluster, 50.0, trust_expired=True)
    b = next(h for h in trusted if h.host_id == "b")
    assert (b.max_loaded, b.evictable, b.ram_total, b.model_replicas) == (2, GIB, GIB, {"m": 1})


# the spec fields through the API


def test_spec_fields_round_trip_through_the_proto() -> None:
    spec = replace(SPEC, host_labels=(("gpu", "h100"), ("zone", "b")), placement="binpack")
    back = convert.spec_from_proto(convert.spec_to_proto(spec))
    assert back.host_labels == spec.host_labels and back.placement == "binpack"
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    legacy = {k: v for k, v in spec.to_dict().items() if k not in ("host_labels", "placement")}
    assert ModelSpec.from_dict(legacy).host_labels == ()


async def test_spec_fields_survive_a_registry_reopen(tmp_path: Path) -> None:
    spec = replace(SPEC, host_labels=(("gpu", "h100"),), placement="spread", source="api")
    registry = await Registry.open(tmp_path / "m.db")
    await registry.put_model(spec)
    await registry.close()
    registry = await Registry.open(tmp_path / "m.db")
    try:
        assert await registry.list_models() == [spec]
    finally:
        await registry.close()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"placement": "pack"}, "placement 'pack' must be one of spread, binpack"),
        ({"host_labels": (("gpu", "h 100"),)}, "host_labels: 'h 100' (of label 'gpu')"),
        ({"host_labels": tuple((f"k{i}", "v") for i in range(17))}, "more than 16 labels"),
    ],
)
def test_bad_spec_fields_are_refused_naming_the_field(
    changes: dict[str, object], message: str
) -> None:
    backends = {"llama": BackendSpec(name="llama", command=("x",))}
    with pytest.raises(InvalidArgument, match="model 'm': ") as caught:
        check_model_spec(replace(SPEC, **changes), backends)  # type: ignore[arg-type]
    assert message in str(caught.value)


def test_the_asking_host_wins_only_among_equals() -> None:
    equal = [host("a"), host("b"), host("c")]
    assert place("m", SPEC, equal, prefer="b") == ["b", "a", "c"]
    busier = [host("a"), host("b", loaded=1), host("c")]
    assert place("m", SPEC, busier, prefer="b") == ["a", "c", "b"]
