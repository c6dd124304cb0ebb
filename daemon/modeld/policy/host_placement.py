"""Which host of the cluster a cold replica of a model starts on (pure).

Takes the hosts' published capacity and returns eligible host ids, best first;
the claim owner asks them in that order and each target's own admission still
has the final word. No I/O, no clock, no logging.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from modeld.errors import FailedPrecondition
from modeld.spec import ModelSpec


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


def place(
    model: str, spec: ModelSpec, hosts: Sequence[HostCapacity], *, mode: str = "spread"
) -> list[str]:
    """Eligible host ids for a new replica of `model`, best first.

    Raises FailedPrecondition naming why when no host is eligible.
    """
    eligible = [h for h in hosts if h.role == "node"]
    if not eligible:
        raise FailedPrecondition(f"model {model!r}: no node host in the cluster can run it")
    return [
        h.host_id
        for h in sorted(
            eligible, key=lambda h: (h.model_replicas.get(model, 0), h.loaded, h.host_id)
        )
    ]
