"""Where eviction is decided: idle and busy timeouts, admission of a new replica, pressure.

Every function takes data, `now` and the settings, and returns decisions; the watchdog
and the router carry them out. A replica is *busy* while it has leases; the idle clock
starts when the last lease ends. Pinned replicas are never chosen for idle, LRU,
memory or group reasons; a busy timeout restarts a stuck replica, pinned or not.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from modeld.policy.view import GpuView, HostView, ReplicaView
from modeld.spec import Settings
from modeld.state import LIVE, STARTING_STATES, ReplicaState

Reason = Literal["idle", "busy_timeout", "lru", "memory", "group"]

_READY = ReplicaState.READY
# Replicas that count against max_loaded: loads in progress count like ready ones.
_COUNTED = STARTING_STATES | {_READY}
# Replicas already on their way out: waiting for them is enough.
_LEAVING = frozenset({ReplicaState.DRAINING, ReplicaState.STOPPING})


@dataclass(frozen=True, slots=True)
class Eviction:
    replica_id: str
    model: str
    reason: Reason
    detail: str


@dataclass(frozen=True, slots=True)
class Admission:
    """What must happen before a new replica may start; at most one of the three is set.

    `evict` empty with `wait` False and `refuse` None means: start it now.
    `wait`: only busy or transitioning victims remain; wait for one to change, re-plan.
    `refuse`: it cannot be admitted (pinned conflicts, infeasible memory); fail now.
    """

    evict: tuple[Eviction, ...] = ()
    wait: bool = False
    refuse: str | None = None
    # Why the plan waits, for the log line and for a client whose deadline runs out.
    detail: str = ""

    @property
    def admitted(self) -> bool:
        return not self.wait and self.refuse is None


def idle_evictions(
    replicas: Sequence[ReplicaView], settings: Settings, now: float
) -> list[Eviction]:
    """Idle READY replicas whose idle time reached their TTL, least recently used first."""
    out: list[Eviction] = []
    for r in sorted(replicas, key=_lru_key):
        ttl = r.idle_ttl if r.idle_ttl is not None else settings.idle_timeout
        if r.pinned or ttl <= 0 or not _is_idle(r) or r.idle_since is None:
            continue
        idle = now - r.idle_since
        if idle >= ttl:
            out.append(Eviction(r.id, r.model, "idle", f"idle {idle:.1f}s >= idle ttl {ttl:g}s"))
    return out


def busy_timeouts(
    replicas: Sequence[ReplicaView], settings: Settings, now: float
) -> list[Eviction]:
    """Replicas whose oldest active lease is older than their busy timeout (0 = off)."""
    out: list[Eviction] = []
    for r in sorted(replicas, key=_lru_key):
        limit = r.busy_timeout if r.busy_timeout is not None else settings.busy_timeout
        started = r.oldest_lease_started
        if limit <= 0 or started is None or r.state not in (_READY, ReplicaState.DRAINING):
            continue
        busy = now - started
        if busy >= limit:
            detail = f"oldest lease active {busy:.1f}s >= busy timeout {limit:g}s"
            out.append(Eviction(r.id, r.model, "busy_timeout", detail))
    return out


def memory_pressure(
    replicas: Sequence[ReplicaView], settings: Settings, host: HostView
) -> Eviction | None:
    """At most one eviction per tick: the LRU idle unpinned replica on the most used device
    whose used fraction exceeds the threshold (host RAM only on hosts without GPUs)."""
    if settings.memory_threshold <= 0:
        return None
    for device, fraction, label in _pressured(host, settings.memory_threshold):
        victims = [r for r in replicas if _on(r, device) and _is_idle(r) and not r.pinned]
        if victims:
            r = min(victims, key=_lru_key)
            detail = (
                f"{label} is {fraction:.0%} used, above the threshold "
                f"{settings.memory_threshold:.0%}; least recently used idle replica there"
            )
            return Eviction(r.id, r.model, "memory", detail)
    return None


def still_due(current: ReplicaView | None, force: bool) -> bool:
    """Whether an eviction decided a moment ago may still be carried out, given the
    victim's view now: a replica routed to since is no longer idle, so only a forced
    eviction may take it."""
    if current is None:
        return False
    if force:
        return current.state in (_READY, ReplicaState.DRAINING)
    return _is_idle(current)


def plan_admission(
    replicas: Sequence[ReplicaView],
    incoming_model: str,
    *,
    incoming_groups: Iterable[str],
    incoming_memory: int,
    target_gpu: int | None,
    settings: Settings,
    host: HostView,
    reserved: int = 0,
) -> Admission:
    """Decide the whole plan before anything is stopped: groups, then memory on the target
    device, then max_loaded (memory victims also free slots, so they are chosen first).
    A refusal anywhere wins over waiting, and waiting wins over evicting, so an infeasible
    or blocked plan never evicts a part of what it would need.

    `reserved` is memory on the target device promised to loads in progress that the
    reading may not show yet. Replicas of `incoming_model` itself are never victims.
    The arguments after the model are keyword-only: several are ints and easy to swap.
    """
    plan = _Plan()
    _plan_groups(plan, replicas, incoming_model, set(incoming_groups), settings)
    _plan_memory(
        plan,
        _MemoryAsk(incoming_model, incoming_memory, target_gpu, reserved),
        replicas,
        settings,
        host,
    )
    _plan_max_loaded(plan, replicas, incoming_model, settings)
    return plan.result()


@dataclass
class _Plan:
    evict: dict[str, Eviction] = field(default_factory=dict)
    # Replicas the plan removes, now or after a wait: their slots and memory are spoken for.
    doomed: dict[str, ReplicaView] = field(default_factory=dict)
    waits: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)

    def evict_now(self, r: ReplicaView, reason: Reason, detail: str) -> None:
        self.evict.setdefault(r.id, Eviction(r.id, r.model, reason, detail))
        self.doomed[r.id] = r

    def wait_for(self, r: ReplicaView, why: str) -> None:
        self.doomed[r.id] = r
        self.waits.append(f"waiting for replica {r.id} ({r.model}) {_what_to_wait_for(r)}: {why}")

    def result(self) -> Admission:
        if self.refusals:
            return Admission(refuse="; ".join(self.refusals))
        if self.waits:
            return Admission(wait=True, detail="; ".join(self.waits))
        return Admission(evict=tuple(self.evict.values()))


@dataclass(frozen=True, slots=True)
class _MemoryAsk:
    model: str
    memory: int
    device: int | None
    reserved: int


def _plan_groups(
    plan: _Plan,
    replicas: Sequence[ReplicaView],
    model: str,
    groups: set[str],
    settings: Settings,
) -> None:
    conflicts = [
        r
        for r in sorted(replicas, key=_lru_key)
        if r.model != model and r.state in LIVE and groups & set(r.groups)
    ]
    pinned = [r for r in conflicts if r.pinned and r.state not in _LEAVING]
    if pinned:
        shared = sorted(groups & {g for r in pinned for g in r.groups})
        plan.refusals.append(
            f"model {model!r} shares concurrency group(s) {', '.join(shared)} with pinned "
            f"model(s) {_names(pinned)}; unpin or unload them first"
        )
        return
    for r in conflicts:
        why = f"shares concurrency group(s) {', '.join(sorted(groups & set(r.groups)))}"
        if _takeable(r, settings):
            plan.evict_now(r, "group", f"{why} with {model}")
        else:
            plan.wait_for(r, why)


def _plan_memory(
    plan: _Plan,
    ask: _MemoryAsk,
    replicas: Sequence[ReplicaView],
    settings: Settings,
    host: HostView,
) -> None:
    if ask.memory <= 0:
        return
    gpu = host.gpu(ask.device) if ask.device is not None else None
    if ask.device is not None and gpu is None:
        plan.refusals.append(f"model {ask.model!r}: GPU {ask.device} is not present on this host")
        return
    label = _label(gpu)
    on_device = [
        r for r in sorted(replicas, key=_lru_key) if _on(r, ask.device) and r.state in LIVE
    ]
    freed = sum(_held(r, ask.device) for r in on_device if r.id in plan.doomed)
    free = (gpu.free if gpu else host.ram_available) - ask.reserved
    have = free + freed
    if ask.memory <= have:
        return
    left = [r for r in on_device if r.id not in plan.doomed and _held(r, ask.device) > 0]
    candidates = [r for r in left if _victim(r, ask.model)]
    pending = [r for r in left if r.state in _LEAVING or _may_become_victim(r, ask.model)]
    evictable = sum(_held(r, ask.device) for r in candidates + pending)
    if ask.memory > have + evictable:
        plan.refusals.append(
            _infeasible(ask, label=label, free=free, freed=freed, evictable=evictable, left=left)
        )
        return
    chosen: list[ReplicaView] = []
    for r in _eviction_order(candidates, settings):
        if have >= ask.memory:
            break
        chosen.append(r)
        have += _held(r, ask.device)
    if have < ask.memory:
        short = _fmt(ask.memory - have)
        plan.waits.append(
            f"waiting for {short} more on {label}, held by busy, starting or stopping replicas"
        )
        return
    for r in chosen:
        plan.evict_now(r, "memory", f"{ask.model} needs {_fmt(ask.memory)} on {label}")


def _infeasible(
    ask: _MemoryAsk,
    *,
    label: str,
    free: int,
    freed: int,
    evictable: int,
    left: Sequence[ReplicaView],
) -> str:
    parts = [f"free {_fmt(free)}"]
    if ask.reserved:
        parts[0] += f" after {_fmt(ask.reserved)} reserved by loads in progress"
    if freed:
        parts.append(f"{_fmt(freed)} freed by group evictions")
    parts.append(f"evictable {_fmt(evictable)}")
    text = (
        f"model {ask.model!r} needs {_fmt(ask.memory)} on {label}, which cannot be made "
        f"available: {', '.join(parts)}"
    )
    pinned = [r for r in left if r.pinned]
    if pinned:
        text += f" (held by pinned model(s) {_names(pinned)})"
    return text


def _plan_max_loaded(
    plan: _Plan, replicas: Sequence[ReplicaView], model: str, settings: Settings
) -> None:
    limit = settings.max_loaded
    counted = [r for r in replicas if r.state in _COUNTED and r.id not in plan.doomed]
    need = len(counted) + 1 - limit
    if limit <= 0 or need <= 0:
        return
    candidates = sorted((r for r in counted if _victim(r, model)), key=_lru_key)
    takeable = _eviction_order(candidates, settings)
    if len(takeable) >= need:
        for r in takeable[:need]:
            plan.evict_now(r, "lru", f"max_loaded {limit} reached; least recently used")
        return
    later = len(candidates) + sum(1 for r in counted if _may_become_victim(r, model))
    if later >= need:
        plan.waits.append(
            f"max_loaded {limit} reached: waiting for {need - len(takeable)} more replica(s) "
            "to become idle"
        )
        return
    blockers = []
    pinned = [r for r in counted if r.pinned]
    if pinned:
        blockers.append(f"pinned model(s) {_names(pinned)}")
    own = sum(1 for r in counted if r.model == model)
    if own:
        blockers.append(f"{own} replica(s) of {model!r} itself")
    plan.refusals.append(
        f"max_loaded {limit} reached and no loaded replica may be evicted for {model!r}: "
        f"{len(counted)} loaded, held by {' and '.join(blockers)}"
    )


def _pressured(host: HostView, threshold: float) -> list[tuple[int | None, float, str]]:
    if not host.gpus:
        if host.ram_total <= 0:
            return []
        used = (host.ram_total - host.ram_available) / host.ram_total
        return [(None, used, "host RAM")] if used > threshold else []
    used_fraction = [(g.used / g.total, g) for g in host.gpus if g.total > 0]
    over = sorted(
        ((f, g) for f, g in used_fraction if f > threshold), key=lambda i: (-i[0], i[1].index)
    )
    return [(g.index, fraction, _label(g)) for fraction, g in over]


def _lru_key(r: ReplicaView) -> tuple[float, str]:
    return (r.last_used, r.id)


def _is_idle(r: ReplicaView) -> bool:
    return r.state is _READY and r.in_flight == 0


def _victim(r: ReplicaView, model: str) -> bool:
    """May be stopped for someone else's admission, now or once idle."""
    return r.state is _READY and not r.pinned and r.model != model


def _may_become_victim(r: ReplicaView, model: str) -> bool:
    return r.state in STARTING_STATES and not r.pinned and r.model != model


def _eviction_order(candidates: Sequence[ReplicaView], settings: Settings) -> list[ReplicaView]:
    """Victims that may go now: idle ones by LRU, then (when forced) busy ones by LRU."""
    ordered = sorted(candidates, key=_lru_key)
    idle = [r for r in ordered if r.in_flight == 0]
    busy = [r for r in ordered if r.in_flight > 0] if settings.force_eviction_when_busy else []
    return idle + busy


def _takeable(r: ReplicaView, settings: Settings) -> bool:
    return r.state is _READY and (r.in_flight == 0 or settings.force_eviction_when_busy)


def _on(r: ReplicaView, device: int | None) -> bool:
    return not r.gpu_ids if device is None else device in r.gpu_ids


def _held(r: ReplicaView, device: int | None) -> int:
    """A multi-GPU replica's memory is taken as split evenly across its GPUs."""
    return r.memory // len(r.gpu_ids) if device is not None and r.gpu_ids else r.memory


def _what_to_wait_for(r: ReplicaView) -> str:
    if r.state in _LEAVING:
        return "to stop"
    if r.state in STARTING_STATES:
        return "to finish starting"
    return f"to become idle ({r.in_flight} in flight)"


def _names(rs: Iterable[ReplicaView]) -> str:
    return ", ".join(sorted({r.model for r in rs})) or "none"


def _label(gpu: GpuView | None) -> str:
    return f"GPU {gpu.index} ({gpu.name})" if gpu else "host RAM"


def _fmt(n: int) -> str:
    gib = 1 << 30
    if abs(n) >= gib:
        return f"{n / gib:.1f} GiB"
    return f"{n / (1 << 20):.1f} MiB"
