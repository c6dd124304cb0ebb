import pytest

from modeld.errors import FailedPrecondition, InvalidArgument
from modeld.policy.placement import default_gpu_count, place
from modeld.policy.view import GpuView

GIB = 1 << 30


def gpu(index: int, free_gib: int, total_gib: int = 24) -> GpuView:
    return GpuView(index, f"GPU-{index}", "Fake", total_gib * GIB, (total_gib - free_gib) * GIB)


GPUS = (gpu(0, 4), gpu(1, 16), gpu(2, 10))


def test_pinned_ids_are_used_as_given() -> None:
    assert place(GPUS, count=1, pinned_ids=[2, 0], reserved={}) == (2, 0)


def test_missing_pinned_ids_are_named_with_what_the_host_has() -> None:
    with pytest.raises(
        FailedPrecondition, match=r"gpu_ids \[3\] not present on this host \(has 0,1\)"
    ):
        place(GPUS[:2], count=1, pinned_ids=[3, 1], reserved={})
    with pytest.raises(FailedPrecondition, match=r"has none"):
        place((), count=0, pinned_ids=[0], reserved={})


def test_count_zero_means_no_gpus() -> None:
    assert place(GPUS, count=0, pinned_ids=[], reserved={}) == ()


def test_most_free_memory_after_reservations_wins() -> None:
    assert place(GPUS, count=1, pinned_ids=[], reserved={}) == (1,)
    assert place(GPUS, count=2, pinned_ids=[], reserved={}) == (1, 2)
    # A load in progress on GPU 1 has claimed 8 GiB the reading does not show yet.
    assert place(GPUS, count=2, pinned_ids=[], reserved={1: 8 * GIB}) == (2, 1)


def test_equal_gpus_are_chosen_by_index() -> None:
    assert place((gpu(1, 8), gpu(0, 8)), count=1, pinned_ids=[], reserved={}) == (0,)


def test_too_few_gpus_says_how_many() -> None:
    with pytest.raises(FailedPrecondition, match=r"needs 4 GPU\(s\); this host has 3"):
        place(GPUS, count=4, pinned_ids=[], reserved={})
    with pytest.raises(InvalidArgument):
        place(GPUS, count=-1, pinned_ids=[], reserved={})


def test_default_gpu_count() -> None:
    assert default_gpu_count(()) == 0
    assert default_gpu_count(GPUS) == 1
