"""Pure placement by declared GPU memory (``--gpu-mem``), and how it shares a GPU with slices.

A GPU offers its memory (NVML's total, or the simulated GPU's size) minus a reserve
for CUDA contexts. Every holder *declares* a part of that:

- a ``--gpu-mem`` job declares what it asked for;
- a slice job of ``s`` slices (of ``K`` per GPU) declares ``s/K`` of what the GPU offers,
  rounded down, so slices alone never declare more than the GPU offers;
- a whole-GPU job declares all of it (and takes only a GPU nobody holds).

A job fits a GPU while the declared memory of its holders plus its own fits what the
GPU offers; among the GPUs it fits, it takes the fullest (best fit, as slices do),
keeping whole GPUs free. Nothing here does I/O; the broker wiring is not built yet.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gpulane.jobs import format_bytes


@dataclass(frozen=True)
class Held:
    """One holder of a GPU: whole, ``slices`` of ``K``, or ``gpu_mem`` bytes."""

    gpu: int
    slices: int = 0  # 0 with gpu_mem None: the whole GPU
    gpu_mem: int | None = None


def offered(total: int, reserve: int) -> int:
    """What a GPU offers jobs: its memory less the reserve for contexts (never below 0)."""
    return max(0, total - reserve)


def declared(held: Held, offer: int, slices_per_gpu: int) -> int:
    if held.gpu_mem is not None:
        return held.gpu_mem
    if held.slices:
        return offer * held.slices // max(1, slices_per_gpu)
    return offer


def free_memory(offers: Sequence[int], holders: Iterable[Held], slices_per_gpu: int) -> list[int]:
    """Per GPU, what it offers less what its holders declared (negative only if the
    holders were placed under another configuration, e.g. a larger reserve now)."""
    free = list(offers)
    for held in holders:
        free[held.gpu] -= declared(held, offers[held.gpu], slices_per_gpu)
    return free


def never_fits(gpu_mem: int, totals: Sequence[int], reserve: int) -> str | None:
    """``None`` if some GPU here could ever hold ``gpu_mem``; else the one-line reason."""
    if not totals:
        return "there are no GPUs on this machine"
    best = max(totals)
    if gpu_mem <= offered(best, reserve):
        return None
    return (
        f"asks for --gpu-mem {format_bytes(gpu_mem)} but the largest GPU here has "
        f"{format_bytes(best)}, of which {format_bytes(offered(best, reserve))} is offered "
        f"to jobs ({format_bytes(reserve)} is kept for CUDA contexts)"
    )


def place(job: Held, offers: Sequence[int], free: Sequence[int], slices_per_gpu: int) -> int | None:
    """The GPU ``job`` (its ``gpu`` field ignored) takes: for a whole GPU the first nobody
    holds, else the fullest that still has room for what it declares there."""
    if job.gpu_mem is None and not job.slices:
        return next((i for i, room in enumerate(free) if room == offers[i]), None)
    candidates = [
        (room, i) for i, room in enumerate(free) if room >= declared(job, offers[i], slices_per_gpu)
    ]
    return min(candidates)[1] if candidates else None
