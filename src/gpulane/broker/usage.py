"""Who used how much GPU, and how busy the GPUs were: pure functions over job records.

No I/O and no clock: every function takes ``now``. A job counts from its
``started_at`` to its ``ended_at`` (or ``now`` while it still runs), weighted by
its GPU share: two whole GPUs are 2.0, one slice of four is 0.25.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from gpulane.broker.store import JobRecord

MINUTE = 60.0


def gpu_share(record: JobRecord, slices_per_gpu: int, offer: int = 0) -> float:
    """GPU-equivalents the job holds (0.0 for a job never granted); a ``--gpu-mem`` job
    its part of what a GPU offers (``offer``; a whole GPU where that is unknown)."""
    if slices_per_gpu <= 0 or not record.assigned_gpus:
        return 0.0
    if record.gpu_mem is not None:
        return min(1.0, record.gpu_mem / offer) if offer > 0 else 1.0
    return len(record.assigned_gpus) * (record.assigned_slices or 0) / slices_per_gpu


def _span(record: JobRecord, now: float) -> tuple[float, float] | None:
    """[start, end] of the job's GPU time up to ``now``; None if it never held a GPU."""
    if record.started_at is None:
        return None
    end = record.ended_at if record.ended_at is not None else now
    return record.started_at, min(end, now)


def gpu_seconds_by_user(
    records: Iterable[JobRecord], since: float, now: float, slices_per_gpu: int, offer: int = 0
) -> dict[str, float]:
    """GPU-equivalent seconds each user used within [since, now]."""
    totals: dict[str, float] = {}
    for record in records:
        span = _span(record, now)
        if span is None:
            continue
        overlap = span[1] - max(span[0], since)
        share = gpu_share(record, slices_per_gpu, offer)
        if overlap <= 0 or share <= 0:
            continue
        totals[record.user] = totals.get(record.user, 0.0) + overlap * share
    return totals


def busy_per_minute(
    records: Iterable[JobRecord],
    gpu_count: int,
    slices_per_gpu: int,
    now: float,
    minutes: int = 60,
    offer: int = 0,
) -> list[dict[str, Any]]:
    """GPU-equivalents in use, averaged per wall-clock minute, for the last ``minutes`` minutes.

    One point per minute, oldest first: ``{"t": minute start (epoch), "busy": 0..gpu_count}``.
    The last point is the current minute, averaged over its elapsed part only.
    """
    if minutes <= 0:
        return []
    current = math.floor(now / MINUTE) * MINUTE
    first = current - (minutes - 1) * MINUTE
    busy = [0.0] * minutes  # GPU-seconds per minute
    for record in records:
        span = _span(record, now)
        share = gpu_share(record, slices_per_gpu, offer)
        if span is None or share <= 0:
            continue
        start, end = max(span[0], first), span[1]
        if end <= start:
            continue
        # Only the minutes this job overlaps: cost is its length, not the window's.
        index = int((start - first) // MINUTE)
        while index < minutes:
            lo = first + index * MINUTE
            if lo >= end:
                break
            overlap = min(end, lo + MINUTE) - max(start, lo)
            if overlap > 0:
                busy[index] += overlap * share
            index += 1
    points = []
    for index, seconds in enumerate(busy):
        lo = first + index * MINUTE
        length = min(MINUTE, now - lo)
        value = seconds / length if length > 0 else 0.0
        points.append({"t": lo, "busy": min(float(gpu_count), max(0.0, value))})
    return points


def local_midnight(now: float) -> float:
    """The epoch of the start of ``now``'s day in the local time zone."""
    day = datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0, microsecond=0)
    return day.timestamp()
