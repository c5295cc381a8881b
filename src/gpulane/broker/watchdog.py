"""Pure decisions of the GPU memory watchdog: from per-process GPU memory readings
(NVML's ``nvmlDeviceGetComputeRunningProcesses``, or a source tests feed) and the
grants in force, what to do: warn a job over its memory, end it after a grace,
report (and, with enforcement on, end) a process that uses a GPU without a grant.

Nothing here does I/O or reads the clock; the broker's loop
(:mod:`gpulane.broker.memory_watch`) reads NVML once a second, calls :func:`decide`,
and acts on the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gpulane.jobs import format_bytes


@dataclass(frozen=True)
class ProcessReading:
    """One process NVML sees on a GPU: its PID and the GPU memory it uses, bytes."""

    gpu: int
    pid: int
    used: int


@dataclass(frozen=True)
class Holder:
    """A job holding (part of) GPUs: its id, the PIDs that are its processes, and
    the GPU memory it was given on each of its GPUs, bytes."""

    job_id: int
    pids: frozenset[int]
    gpus: frozenset[int]
    granted: int


@dataclass(frozen=True)
class Warn:
    job_id: int
    message: str


@dataclass(frozen=True)
class End:
    job_id: int
    message: str


@dataclass(frozen=True)
class Stray:
    """A process using a GPU that belongs to no grant; ``end`` when enforcement is on."""

    gpu: int
    pid: int
    used: int
    end: bool


@dataclass(frozen=True)
class Decision:
    warnings: tuple[Warn, ...]
    ends: tuple[End, ...]
    strays: tuple[Stray, ...]
    # job id -> when it was first seen over its memory; jobs back under (or gone) drop out.
    over_since: Mapping[int, float]


def over_message(used: int, granted: int) -> str:
    """The line a user reads: how much the job uses, how much it was given, how to ask."""
    return (
        f"your job uses {format_bytes(used)} of the {format_bytes(granted)} of GPU memory "
        "it was given; ask for more with --gpu-mem (e.g. --gpu-mem 16G) or a whole GPU"
    )


def decide(
    readings: Iterable[ProcessReading],
    holders: Iterable[Holder],
    over_since: Mapping[int, float],
    now: float,
    grace: float,
    enforce: bool,
    slack: int = 0,
) -> Decision:
    """Per job, the most memory it uses on any one of its GPUs against its grant.

    A job is over once it uses more than its grant plus ``slack`` (NVML counts a
    process's CUDA context, a few hundred MiB, which no framework cap includes; the
    message still names the grant itself). A job over its grant is warned the first time and ended once it has stayed over
    for ``grace`` seconds; a job back under its grant starts afresh. A process whose
    PID belongs to no holder of that GPU is a stray (a process on a GPU its job was
    not given is a stray too: the grant is per GPU). A job whose processes are gone
    simply has no readings: it is neither warned nor ended.
    """
    holders = list(holders)
    owner: dict[tuple[int, int], Holder] = {}
    for holder in holders:
        for pid in holder.pids:
            for gpu in holder.gpus:
                owner[(gpu, pid)] = holder
    per_job_gpu: dict[tuple[int, int], int] = {}
    strays: list[Stray] = []
    for reading in readings:
        found = owner.get((reading.gpu, reading.pid))
        if found is None:
            strays.append(Stray(reading.gpu, reading.pid, reading.used, enforce))
            continue
        key = (found.job_id, reading.gpu)
        per_job_gpu[key] = per_job_gpu.get(key, 0) + max(0, reading.used)
    warnings: list[Warn] = []
    ends: list[End] = []
    still_over: dict[int, float] = {}
    for holder in holders:
        used = max((u for (job, _), u in per_job_gpu.items() if job == holder.job_id), default=0)
        if used <= holder.granted + slack:
            continue
        message = over_message(used, holder.granted)
        since = over_since.get(holder.job_id)
        if since is None:
            still_over[holder.job_id] = now
            warnings.append(Warn(holder.job_id, message))
        elif now - since >= grace:
            ends.append(End(holder.job_id, f"ended by the GPU memory watchdog: {message}"))
        else:
            still_over[holder.job_id] = since
    return Decision(tuple(warnings), tuple(ends), tuple(strays), still_over)


def read_nvml(nvml: Any, gpu_count: int) -> list[ProcessReading]:
    """Per-process GPU memory through NVML (``nvmlDeviceGetComputeRunningProcesses``).

    ``nvml`` is the imported ``pynvml`` module, already initialised (the inventory's).
    NVML reports ``usedGpuMemory`` as None where it cannot tell (some MIG and permission
    setups): that process counts as using 0 bytes, so it is still seen as a stray.
    """
    readings: list[ProcessReading] = []
    for index in range(gpu_count):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            used = getattr(process, "usedGpuMemory", None)
            readings.append(ProcessReading(index, int(process.pid), int(used or 0)))
    return readings
