"""Which host of the cluster a cold replica of a model starts on (pure).

Takes the hosts' published capacity and returns eligible host ids, best first;
the claim owner asks them in that order and each target's own admission still
has the final word. No I/O, no clock, no logging.

Eligible: a node (not a router) with the model's backend configured, whose labels
hold all of the spec's `host_labels`, with a device the `memory_estimate` fits in
(the largest GPU's total; host RAM when the host has no GPUs or the spec asks for
`gpus = 0`; an unknown total, 0, is not held against a host).

Order, best first:
1. hosts that can take it without evicting anything: free memory on a device
   (as published) >= the estimate, and fewer replicas loaded than max_loaded;
   then hosts where evicting idle, unpinned replicas makes room (published
   evictable bytes cover the shortfall), cheapest first (fewest bytes to free);
   last, hosts that would have to wait for busy replicas;
2. `spread`: fewer replicas of this model first; `binpack`: more first (before
   the loaded count, or a host already running the model, whose count includes
   it, would always lose and binpack could never pack);
3. fewer loaded replicas (of any model);
4. `prefer` (the asking modeld's own host), which saves a forwarded Load and
   makes the waiters there local;
5. host id, so the order is total.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from modeld.errors import FailedPrecondition
from modeld.spec import ModelSpec

GIB = 1 << 30
# How many hosts a refusal names before it says "and N more".
_LISTED = 8


@dataclass(frozen=True, slots=True)
class HostCapacity:
    host_id: str
    role: str
    labels: Mapping[str, str] = field(default_factory=dict)
    backends: frozenset[str] = frozenset()
    # Published free and total bytes per GPU; () for a host without GPUs.
    gpu_free: tuple[int, ...] = ()
    gpu_total: tuple[int, ...] = ()
    ram_free: int = 0
    # Live replicas of all models on the host, and its max_loaded (0 = no limit).
    loaded: int = 0
    max_loaded: int = 0
    # Bytes held by idle, unpinned replicas: what eviction there could free.
    evictable: int = 0
    model_replicas: Mapping[str, int] = field(default_factory=dict)
    # Host RAM in bytes (0 = unknown): the device of a host without GPUs.
    ram_total: int = 0


def place(
    model: str,
    spec: ModelSpec,
    hosts: Sequence[HostCapacity],
    *,
    mode: str = "spread",
    prefer: str = "",
) -> list[str]:
    """Eligible host ids for a new replica of `model`, best first (see the module doc).

    `mode` is "spread" or "binpack" (the spec's placement, else the cluster's).
    Raises FailedPrecondition naming why when no host is eligible.
    """
    eligible = eligible_hosts(model, spec, hosts)
    sign = -1 if mode == "binpack" else 1
    return [
        h.host_id
        for h in sorted(
            eligible,
            key=lambda h: (
                *eviction_rank(h, spec),
                sign * h.model_replicas.get(model, 0),
                h.loaded,
                h.host_id != prefer,
                h.host_id,
            ),
        )
    ]


def placement_mode(spec: ModelSpec, default: str) -> str:
    """The `mode` for `place`: the spec's placement, else the cluster's default."""
    return spec.placement or default


def eligible_hosts(
    model: str, spec: ModelSpec, hosts: Sequence[HostCapacity]
) -> list[HostCapacity]:
    """The hosts that could ever run `spec`; FailedPrecondition naming the first filter
    that left none."""
    nodes = [h for h in hosts if h.role == "node"]
    if not nodes:
        raise FailedPrecondition(
            f"model {model!r}: no node host in the cluster can run it "
            f"(hosts: {_listing(hosts, lambda h: h.role)})"
        )
    with_backend = [h for h in nodes if spec.backend in h.backends]
    if not with_backend:
        raise FailedPrecondition(
            f"model {model!r}: no host has backend {spec.backend!r} "
            f"(hosts: {_listing(nodes, lambda h: _names(h.backends))})"
        )
    wanted = dict(spec.host_labels)
    labelled = [h for h in with_backend if all(h.labels.get(k) == v for k, v in wanted.items())]
    if not labelled:
        seen = _listing(with_backend, lambda h: _labels(h.labels))
        raise FailedPrecondition(
            f"model {model!r}: labels {_labels(wanted)} matched no host with backend "
            f"{spec.backend!r} (hosts' labels: {seen})"
        )
    fitting = [h for h in labelled if _fits(h, spec)]
    if not fitting:
        largest = max(labelled, key=lambda h: _device_total(h, spec))
        raise FailedPrecondition(
            f"model {model!r}: memory estimate {_gib(spec.memory_estimate)} is larger than "
            f"any host's device (largest: {_gib(_device_total(largest, spec))} on "
            f"{largest.host_id})"
        )
    return fitting


def eviction_rank(host: HostCapacity, spec: ModelSpec) -> tuple[int, int]:
    """(tier, cost): 0 = room without evicting; 1 = evicting idle replicas makes room,
    cost the bytes to free; 2 = only busy replicas stand in the way, cost the bytes
    that idle ones cannot cover."""
    need = spec.memory_estimate
    shortfall = max(need - _device_free(host, spec), 0)
    full = host.max_loaded > 0 and host.loaded >= host.max_loaded
    if not shortfall and not full:
        return (0, 0)
    if host.evictable >= shortfall and (host.evictable > 0 or not full):
        return (1, shortfall)
    return (2, shortfall - host.evictable)


def _on_gpu(host: HostCapacity, spec: ModelSpec) -> bool:
    return bool(host.gpu_total) and spec.gpus != 0


def _pinned(host: HostCapacity, spec: ModelSpec) -> int | None:
    """The main GPU a spec pins, when this host has it (else any GPU may be the main one)."""
    if spec.gpu_ids and spec.gpu_ids[0] < len(host.gpu_total):
        return spec.gpu_ids[0]
    return None


def _device_free(host: HostCapacity, spec: ModelSpec) -> int:
    if not _on_gpu(host, spec):
        return host.ram_free
    main = _pinned(host, spec)
    if main is not None:
        return host.gpu_free[main] if main < len(host.gpu_free) else 0
    return max(host.gpu_free, default=0)


def _device_total(host: HostCapacity, spec: ModelSpec) -> int:
    if not _on_gpu(host, spec):
        return host.ram_total
    main = _pinned(host, spec)
    return host.gpu_total[main] if main is not None else max(host.gpu_total)


def _fits(host: HostCapacity, spec: ModelSpec) -> bool:
    total = _device_total(host, spec)
    return total == 0 or spec.memory_estimate <= total


def _gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"


def _names(names: frozenset[str]) -> str:
    return "[" + ", ".join(sorted(names)) + "]"


def _labels(labels: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"


def _listing(hosts: Sequence[HostCapacity], describe: Callable[[HostCapacity], str]) -> str:
    shown = [f"{h.host_id} {describe(h)}" for h in sorted(hosts, key=lambda h: h.host_id)]
    more = len(shown) - _LISTED
    return ", ".join(shown[:_LISTED]) + (f" and {more} more" if more > 0 else "") or "none"
