"""Placement by declared GPU memory, mixed with slices (issue 14): never over the card."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gpulane.broker.gpu_memory import Held, free_memory, never_fits, offered, place

GiB = 1024**3


def test_slices_and_gpu_mem_share_one_gpu() -> None:
    offers = [offered(16 * GiB, GiB)]  # 15 GiB offered
    holders = [Held(0, slices=1)]  # one slice of three: 5 GiB declared
    free = free_memory(offers, holders, 3)
    assert free == [10 * GiB]
    assert place(Held(0, gpu_mem=10 * GiB), offers, free, 3) == 0
    assert (
        place(Held(0, gpu_mem=10 * GiB + 1), offers, free, 3) is None
    )  # queued, not refused: it fits an empty GPU


def test_whole_gpu_holder_declares_everything() -> None:
    offers = [8 * GiB, 8 * GiB]
    free = free_memory(offers, [Held(1)], 4)
    assert free == [8 * GiB, 0]
    assert place(Held(0), offers, free, 4) == 0
    sliced = free_memory(offers, [Held(0, slices=1), Held(1, gpu_mem=1)], 4)
    assert place(Held(0), offers, sliced, 4) is None  # a whole GPU needs nobody on it


def test_best_fit_keeps_the_empty_gpu_free() -> None:
    assert place(Held(0, gpu_mem=2 * GiB), [8 * GiB] * 2, [8 * GiB, 3 * GiB], 1) == 1


def test_never_fits_names_the_card_size() -> None:
    assert never_fits(15 * GiB, [16 * GiB], GiB) is None
    reason = never_fits(40 * GiB, [16 * GiB, 16 * GiB], GiB)
    assert reason is not None and "\n" not in reason
    assert "40.0 GiB" in reason and "16.0 GiB" in reason and "15.0 GiB" in reason
    assert never_fits(GiB, [], 0) == "there are no GPUs on this machine"


@given(
    st.lists(st.integers(1, 80 * GiB), min_size=1, max_size=4),
    st.integers(0, 2 * GiB),
    st.integers(1, 8),
    st.lists(
        st.one_of(
            st.tuples(st.just("mem"), st.integers(1, 80 * GiB)),
            st.tuples(st.just("slices"), st.integers(1, 8)),
            st.tuples(st.just("whole"), st.just(0)),
        ),
        max_size=30,
    ),
)
def test_declared_memory_on_a_gpu_never_exceeds_what_it_offers(
    totals: list[int], reserve: int, spg: int, jobs: list[tuple[str, int]]
) -> None:
    offers = [offered(t, reserve) for t in totals]
    holders: list[Held] = []
    for kind, value in jobs:
        if kind == "slices" and value > spg:
            continue  # refused at submit by policy.fits_machine
        candidate = {
            "mem": Held(0, gpu_mem=value),
            "slices": Held(0, slices=value),
            "whole": Held(0),
        }[kind]
        if kind == "mem" and never_fits(value, totals, reserve) is not None:
            assert value > max(offers)  # refused only when no GPU could ever hold it
            continue
        free = free_memory(offers, holders, spg)
        gpu = place(candidate, offers, free, spg)
        if gpu is not None:
            holders.append(Held(gpu, candidate.slices, candidate.gpu_mem))
        for i, room in enumerate(free_memory(offers, holders, spg)):
            assert room >= 0, (i, holders)
