from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from modeld.policy.eviction import (
    Admission,
    Eviction,
    busy_timeouts,
    idle_evictions,
    memory_pressure,
    plan_admission,
    still_due,
)
from modeld.policy.view import GpuView, HostView, ReplicaView
from modeld.spec import Settings
from modeld.state import ReplicaState
from watchdog_fakes import GIB, busy
from watchdog_fakes import view as rv

NOW = 1000.0
R = ReplicaState


def host(*gpus: GpuView, ram_total: int = 64 * GIB, ram_available: int = 32 * GIB) -> HostView:
    return HostView(ram_total, ram_available, gpus)


def gpu(index: int = 0, used_gib: float = 0, total_gib: int = 24) -> GpuView:
    return GpuView(index, f"GPU-{index}", "Fake", total_gib * GIB, int(used_gib * GIB))


ROOMY = host(gpu(0), gpu(1))


def plan(
    replicas: list[ReplicaView],
    settings: Settings,
    *,
    model: str = "new",
    groups: tuple[str, ...] = (),
    memory: int = 0,
    target: int | None = 0,
    host_view: HostView = ROOMY,
    reserved: int = 0,
) -> Admission:
    return plan_admission(
        replicas,
        model,
        incoming_groups=groups,
        incoming_memory=memory,
        target_gpu=target,
        settings=settings,
        host=host_view,
        reserved=reserved,
    )


def evicted(admission: Admission) -> list[tuple[str, str]]:
    return [(e.replica_id, e.reason) for e in admission.evict]


# idle


def test_idle_clock_starts_when_the_last_lease_ends() -> None:
    settings = Settings(idle_timeout=60)
    # Started long ago, but its last lease ended 10 s ago.
    recent = rv("a", last_used=990.0, idle_since=990.0)
    assert idle_evictions([recent], settings, NOW) == []
    assert [e.replica_id for e in idle_evictions([recent], settings, 1050.0)] == ["a"]


def test_a_busy_replica_is_never_idle_however_old() -> None:
    settings = Settings(idle_timeout=1)
    assert idle_evictions([busy("a")], settings, NOW) == []


def test_idle_eviction_reports_reason_and_times() -> None:
    [eviction] = idle_evictions([rv("a", idle_since=700.0)], Settings(idle_timeout=300), NOW)
    assert eviction == Eviction("a", "model-a", "idle", "idle 300.0s >= idle ttl 300s")


def test_model_idle_ttl_overrides_settings_and_zero_means_never() -> None:
    settings = Settings(idle_timeout=10)
    never = rv("a", idle_ttl=0.0, idle_since=0.0)
    short = rv("b", idle_ttl=5.0, idle_since=994.0)
    long = rv("c", idle_ttl=500.0, idle_since=900.0)
    assert [e.replica_id for e in idle_evictions([never, short, long], settings, NOW)] == ["b"]
    assert idle_evictions([rv("d", idle_since=0.0)], Settings(idle_timeout=0), NOW) == []


def test_pinned_and_non_ready_replicas_are_never_idle_evicted() -> None:
    settings = Settings(idle_timeout=1)
    pinned = rv("a", pinned=True, idle_since=0.0)
    loading = rv("b", state=R.LOADING, idle_since=0.0)
    assert idle_evictions([pinned, loading], settings, NOW) == []


# busy timeout


def test_busy_timeout_restarts_stuck_replicas_pinned_or_not() -> None:
    settings = Settings(busy_timeout=30)
    stuck = busy("a", oldest_lease_started=960.0)
    stuck_pinned = busy("b", pinned=True, oldest_lease_started=900.0)
    fresh = busy("c", oldest_lease_started=990.0)
    out = busy_timeouts([stuck, stuck_pinned, fresh], settings, NOW)
    assert sorted((e.replica_id, e.reason) for e in out) == [
        ("a", "busy_timeout"),
        ("b", "busy_timeout"),
    ]


def test_busy_timeout_off_and_overrides() -> None:
    stuck = busy("a", oldest_lease_started=0.0)
    assert busy_timeouts([stuck], Settings(busy_timeout=0), NOW) == []
    assert busy_timeouts([replace(stuck, busy_timeout=0.0)], Settings(busy_timeout=5), NOW) == []
    tight = busy("b", busy_timeout=10.0, oldest_lease_started=985.0)
    assert [e.replica_id for e in busy_timeouts([tight], Settings(), NOW)] == ["b"]
    assert busy_timeouts([rv("c", oldest_lease_started=None)], Settings(busy_timeout=1), NOW) == []


# max_loaded (LRU)


def test_no_limits_admits_without_evicting() -> None:
    admission = plan([rv("a"), busy("b")], Settings())
    assert admission.admitted and admission.evict == ()


def test_lru_evicts_the_least_recently_used_idle_replica() -> None:
    replicas = [rv("a", last_used=500.0), rv("b", last_used=400.0), rv("c", last_used=600.0)]
    admission = plan(replicas, Settings(max_loaded=3))
    assert evicted(admission) == [("b", "lru")]
    assert evicted(plan(replicas, Settings(max_loaded=2))) == [("b", "lru"), ("a", "lru")]


def test_lru_skips_busy_replicas() -> None:
    replicas = [busy("old", last_used=100.0), rv("young", last_used=800.0)]
    assert evicted(plan(replicas, Settings(max_loaded=2))) == [("young", "lru")]


def test_lru_waits_when_only_busy_replicas_remain() -> None:
    replicas = [busy("a"), rv("b")]
    admission = plan(replicas, Settings(max_loaded=1))
    # Evicting "b" alone would not make room: nothing is evicted until everything can be.
    assert admission.wait and admission.evict == () and admission.refuse is None
    assert "max_loaded 1" in admission.detail


def test_force_eviction_when_busy_evicts_busy_replicas_idle_first() -> None:
    replicas = [busy("a", last_used=100.0), rv("b", last_used=800.0)]
    admission = plan(replicas, Settings(max_loaded=1, force_eviction_when_busy=True))
    assert evicted(admission) == [("b", "lru"), ("a", "lru")]


def test_loads_in_progress_count_against_max_loaded_and_are_waited_for() -> None:
    replicas = [rv("a", state=R.LOADING), rv("b", state=R.STARTING)]
    assert plan(replicas, Settings(max_loaded=2)).wait
    draining = [rv("c", state=R.DRAINING), rv("d", state=R.STOPPING)]
    assert plan(draining, Settings(max_loaded=1)).admitted


def test_all_pinned_refuses_naming_the_pinned_models() -> None:
    replicas = [rv("a", "llama", pinned=True), rv("b", "whisper", pinned=True)]
    admission = plan(replicas, Settings(max_loaded=2))
    assert admission.refuse is not None and admission.evict == () and not admission.wait
    assert "max_loaded 2 reached" in admission.refuse
    assert "pinned model(s) llama, whisper" in admission.refuse


def test_replicas_of_the_incoming_model_are_not_victims() -> None:
    admission = plan([rv("a", "new")], Settings(max_loaded=1))
    assert admission.refuse is not None
    assert "1 replica(s) of 'new' itself" in admission.refuse


# memory


def test_infeasible_load_evicts_nothing_and_explains_the_numbers() -> None:
    replicas = [
        rv("small", memory=2 * GIB, gpu_ids=(0,)),
        rv("big", "llama", memory=14 * GIB, pinned=True, gpu_ids=(0,)),
        rv("elsewhere", memory=20 * GIB, gpu_ids=(1,)),
    ]
    view = host(gpu(0, used_gib=20), gpu(1, used_gib=20))
    # max_loaded alone would evict "small"; the memory check must veto the whole plan.
    admission = plan(replicas, Settings(max_loaded=3), memory=8 * GIB, host_view=view)
    assert admission.evict == () and not admission.wait
    assert admission.refuse == (
        "model 'new' needs 8.0 GiB on GPU 0 (Fake), which cannot be made available: "
        "free 4.0 GiB, evictable 2.0 GiB (held by pinned model(s) llama)"
    )


def test_memory_evicts_lru_idle_replicas_on_the_target_device_only() -> None:
    replicas = [
        rv("a", memory=4 * GIB, last_used=300.0),
        rv("b", memory=4 * GIB, last_used=100.0),
        rv("c", memory=4 * GIB, last_used=200.0),
        rv("other-gpu", memory=8 * GIB, last_used=0.0, gpu_ids=(1,)),
        rv("pinned", memory=8 * GIB, last_used=0.0, pinned=True),
    ]
    view = host(gpu(0, used_gib=22), gpu(1, used_gib=10))
    admission = plan(replicas, Settings(), memory=9 * GIB, host_view=view)
    # 2 GiB free; b then c free 8 more.
    assert evicted(admission) == [("b", "memory"), ("c", "memory")]
    assert "needs 9.0 GiB on GPU 0 (Fake)" in admission.evict[0].detail


def test_memory_victims_also_count_for_max_loaded() -> None:
    replicas = [rv("a", memory=4 * GIB, last_used=900.0), rv("b", last_used=100.0, gpu_ids=(1,))]
    view = host(gpu(0, used_gib=22), gpu(1))
    admission = plan(replicas, Settings(max_loaded=2), memory=4 * GIB, host_view=view)
    assert evicted(admission) == [("a", "memory")]


def test_memory_waits_for_busy_replicas_unless_forced() -> None:
    replicas = [busy("a", memory=8 * GIB)]
    view = host(gpu(0, used_gib=20))
    waiting = plan(replicas, Settings(), memory=8 * GIB, host_view=view)
    assert waiting.wait and waiting.evict == ()
    forced = plan(replicas, Settings(force_eviction_when_busy=True), memory=8 * GIB, host_view=view)
    assert evicted(forced) == [("a", "memory")]


def test_reserved_memory_of_loads_in_progress_is_not_free() -> None:
    view = host(gpu(0, used_gib=16))
    assert plan([], Settings(), memory=8 * GIB, host_view=view).admitted
    admission = plan([], Settings(), memory=8 * GIB, host_view=view, reserved=4 * GIB)
    assert admission.refuse is not None
    assert "free 4.0 GiB after 4.0 GiB reserved by loads in progress" in admission.refuse


def test_host_ram_is_the_device_without_a_gpu() -> None:
    replicas = [rv("cpu", memory=8 * GIB, gpu_ids=()), rv("gpu", memory=8 * GIB)]
    view = host(gpu(0), ram_total=16 * GIB, ram_available=2 * GIB)
    admission = plan(replicas, Settings(), memory=6 * GIB, target=None, host_view=view)
    assert evicted(admission) == [("cpu", "memory")]


def test_absent_target_gpu_is_refused() -> None:
    admission = plan([], Settings(), memory=GIB, target=5)
    assert admission.refuse == "model 'new': GPU 5 is not present on this host"


# groups


def test_groups_evict_the_conflicting_model_only() -> None:
    replicas = [
        rv("a", "sd", groups=("image",)),
        rv("b", "llama", groups=("text",)),
        rv("c", "new", groups=("image",)),
    ]
    admission = plan(replicas, Settings(), groups=("image", "audio"))
    assert evicted(admission) == [("a", "group")]
    assert admission.evict[0].detail == "shares concurrency group(s) image with new"


def test_pinned_group_conflict_is_refused_by_name() -> None:
    replicas = [rv("a", "sd", groups=("image",), pinned=True)]
    admission = plan(replicas, Settings(), groups=("image",))
    assert admission.refuse is not None and admission.evict == ()
    assert "pinned model(s) sd" in admission.refuse


def test_busy_or_starting_group_conflicts_wait_unless_forced() -> None:
    replicas = [busy("a", "sd", groups=("g",)), rv("b", "tts", groups=("g",))]
    waiting = plan(replicas, Settings(), groups=("g",))
    assert waiting.wait and waiting.evict == ()
    assert "replica a (sd) to become idle (1 in flight)" in waiting.detail
    forced = plan(replicas, Settings(force_eviction_when_busy=True), groups=("g",))
    assert sorted(evicted(forced)) == [("a", "group"), ("b", "group")]
    starting = plan([rv("c", "sd", state=R.LOADING, groups=("g",))], Settings(), groups=("g",))
    assert starting.wait and "to finish starting" in starting.detail


def test_group_victims_free_memory_and_slots() -> None:
    replicas = [rv("a", "sd", groups=("g",), memory=10 * GIB), rv("b", last_used=0.0)]
    view = host(gpu(0, used_gib=20))
    admission = plan(
        replicas, Settings(max_loaded=2), groups=("g",), memory=12 * GIB, host_view=view
    )
    assert evicted(admission) == [("a", "group")]


# memory pressure


def test_memory_pressure_picks_lru_idle_unpinned_replica_on_the_hot_device() -> None:
    replicas = [
        rv("pinned", last_used=0.0, pinned=True),
        busy("busy", last_used=10.0),
        rv("young", last_used=500.0),
        rv("old", last_used=100.0),
        rv("cool-gpu", last_used=0.0, gpu_ids=(1,)),
    ]
    view = host(gpu(0, used_gib=22), gpu(1, used_gib=2))
    eviction = memory_pressure(replicas, Settings(memory_threshold=0.9), view)
    assert eviction is not None
    assert (eviction.replica_id, eviction.reason) == ("old", "memory")
    assert "GPU 0 (Fake) is 92% used" in eviction.detail


def test_memory_pressure_none_when_under_threshold_off_or_nothing_qualifies() -> None:
    view = host(gpu(0, used_gib=22))
    assert memory_pressure([rv("a")], Settings(memory_threshold=0.95), view) is None
    assert memory_pressure([rv("a")], Settings(memory_threshold=0), view) is None
    only_pinned = [rv("a", pinned=True), busy("b")]
    assert memory_pressure(only_pinned, Settings(memory_threshold=0.5), view) is None


def test_memory_pressure_on_host_ram_without_gpus() -> None:
    view = host(ram_total=16 * GIB, ram_available=GIB)
    replicas = [rv("a", gpu_ids=(), last_used=5.0), rv("b", gpu_ids=(), last_used=1.0)]
    eviction = memory_pressure(replicas, Settings(memory_threshold=0.9), view)
    assert eviction is not None and eviction.replica_id == "b"


# properties


states = st.sampled_from([R.STARTING, R.LOADING, R.READY, R.READY, R.DRAINING, R.STOPPING])
replica_lists = st.lists(
    st.builds(
        rv,
        id=st.text("abcdefgh", min_size=1, max_size=2),
        model=st.sampled_from(["m1", "m2", "m3", "new"]),
        state=states,
        in_flight=st.integers(0, 2),
        last_used=st.floats(0, 1000),
        gpu_ids=st.sampled_from([(), (0,), (1,)]),
        memory=st.integers(0, 8).map(lambda n: n * GIB),
        pinned=st.booleans(),
        groups=st.sampled_from([(), ("g",), ("h",)]),
    ),
    max_size=8,
    unique_by=lambda r: r.id,
)


@given(
    replicas=replica_lists,
    max_loaded=st.integers(0, 4),
    force=st.booleans(),
    memory=st.integers(0, 12).map(lambda n: n * GIB),
    target=st.sampled_from([None, 0, 1]),
    groups=st.sampled_from([(), ("g",)]),
)
def test_admission_invariants(
    *,
    replicas: list[ReplicaView],
    max_loaded: int,
    force: bool,
    memory: int,
    target: int | None,
    groups: tuple[str, ...],
) -> None:
    settings = Settings(max_loaded=max_loaded, force_eviction_when_busy=force)
    view = host(gpu(0, used_gib=16), gpu(1, used_gib=20), ram_available=8 * GIB)
    admission = plan(
        replicas, settings, memory=memory, target=target, groups=groups, host_view=view
    )
    assert sum([bool(admission.evict), admission.wait, admission.refuse is not None]) <= 1
    by_id = {r.id: r for r in replicas}
    victims = [by_id[e.replica_id] for e in admission.evict]
    assert len({v.id for v in victims}) == len(victims)
    for v in victims:
        assert not v.pinned and v.model != "new" and v.state is R.READY
        assert force or v.in_flight == 0
    if admission.admitted and max_loaded:
        counted = [r for r in replicas if r.state in {R.STARTING, R.LOADING, R.READY}]
        assert len(counted) - len(victims) + 1 <= max_loaded
    if admission.admitted and memory:
        target_gpu = view.gpu(target) if target is not None else None
        free = target_gpu.free if target_gpu else view.ram_available
        on_device = [
            v for v in victims if (target in v.gpu_ids if target is not None else not v.gpu_ids)
        ]
        assert free + sum(v.memory for v in on_device) >= memory


# carrying a decision out


def test_a_decision_is_still_due_only_while_its_victim_is_as_it_was_chosen() -> None:
    assert still_due(rv("a"), force=False)
    assert not still_due(None, force=False)
    assert not still_due(busy("a"), force=False)
    assert not still_due(rv("a", state=R.STOPPING), force=False)
    assert still_due(busy("a"), force=True)
    assert still_due(busy("a", state=R.DRAINING), force=True)
    assert not still_due(rv("a", state=R.STOPPED), force=True)
