"""Which GPUs a new replica gets."""

from collections.abc import Iterable, Mapping, Sequence

from modeld.errors import FailedPrecondition, InvalidArgument
from modeld.policy.view import GpuView
from modeld.spec import ModelSpec


def place(
    gpus: Sequence[GpuView],
    count: int,
    pinned_ids: Sequence[int],
    reserved: Mapping[int, int],
) -> tuple[int, ...]:
    """GPU indexes for a new replica, best first (the first is its main GPU).

    Pinned ids win as given. Otherwise the `count` GPUs with the most free memory once
    `reserved` (estimates of replicas still loading there, by GPU index) is taken off.
    """
    present = sorted(g.index for g in gpus)
    if pinned_ids:
        missing = sorted({i for i in pinned_ids if i not in present})
        if missing:
            raise FailedPrecondition(
                f"gpu_ids {missing} not present on this host (has {_listing(present)})"
            )
        return tuple(pinned_ids)
    if count < 0:
        raise InvalidArgument(f"GPU count must not be negative (got {count})")
    if count == 0:
        return ()
    if count > len(gpus):
        raise FailedPrecondition(
            f"model needs {count} GPU(s); this host has {len(gpus)} ({_listing(present)})"
        )
    ranked = sorted(gpus, key=lambda g: (-(g.free - reserved.get(g.index, 0)), g.index))
    return tuple(g.index for g in ranked[:count])


def unrunnable(specs: Iterable[ModelSpec], gpus: Sequence[GpuView]) -> dict[str, str]:
    """Models no load could ever place on these GPUs, each with the refusal a load gets."""
    refused = {}
    for spec in specs:
        count = spec.gpus if spec.gpus is not None else default_gpu_count(gpus)
        try:
            place(gpus, count, spec.gpu_ids, {})
        except (FailedPrecondition, InvalidArgument) as exc:
            refused[spec.name] = str(exc)
    return refused


def default_gpu_count(gpus: Sequence[GpuView]) -> int:
    """A model that does not say how many GPUs it wants gets one when the host has any."""
    return 1 if gpus else 0


def _listing(indexes: Sequence[int]) -> str:
    return ",".join(str(i) for i in indexes) or "none"
