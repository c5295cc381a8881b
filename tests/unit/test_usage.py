"""The usage report's arithmetic: GPU-seconds per user and GPU use per minute."""

from __future__ import annotations

import itertools
import time
from datetime import datetime

import pytest

from gpulane.broker.store import JobRecord
from gpulane.broker.usage import (
    busy_per_minute,
    gpu_seconds_by_user,
    local_midnight,
)
from gpulane.jobs import JobState

NOW = 1_700_000_000.0 - (1_700_000_000.0 % 60) + 30  # half a minute into a minute


def job(
    user: str,
    started: float | None,
    ended: float | None,
    gpus: tuple[int, ...] = (0,),
    slices: int = 1,
) -> JobRecord:
    record = JobRecord(
        uid=1000,
        user=user,
        name="job",
        gpus=len(gpus),
        slices=0,
        time_limit=3600,
        mem=None,
        command=["true"],
        submitted_at=(started or NOW) - 5,
        state=JobState.RUNNING if ended is None else JobState.COMPLETED,
        started_at=started,
        ended_at=ended,
        assigned_gpus=list(gpus) if started is not None else [],
        assigned_slices=slices if started is not None else None,
    )
    return record


class TestGpuSeconds:
    def test_empty(self) -> None:
        assert gpu_seconds_by_user([], NOW - 100, NOW, 1) == {}

    def test_inside_window(self) -> None:
        records = [job("ann", NOW - 50, NOW - 20)]
        assert gpu_seconds_by_user(records, NOW - 100, NOW, 1) == {"ann": 30.0}

    def test_clipped_at_window_start(self) -> None:
        records = [job("ann", NOW - 200, NOW - 40)]
        assert gpu_seconds_by_user(records, NOW - 100, NOW, 1) == {"ann": 60.0}

    def test_ended_before_window_is_left_out(self) -> None:
        records = [job("ann", NOW - 300, NOW - 100), job("bob", NOW - 300, NOW - 150)]
        assert gpu_seconds_by_user(records, NOW - 100, NOW, 1) == {}

    def test_running_counts_up_to_now(self) -> None:
        records = [job("ann", NOW - 200, None)]
        assert gpu_seconds_by_user(records, NOW - 100, NOW, 1) == {"ann": 100.0}

    def test_never_started_is_left_out(self) -> None:
        cancelled = job("ann", None, None)
        cancelled.ended_at, cancelled.state = NOW - 10, JobState.CANCELLED
        assert gpu_seconds_by_user([cancelled], NOW - 100, NOW, 1) == {}

    def test_weighted_by_share(self) -> None:
        records = [
            job("ann", NOW - 100, None, gpus=(0, 1), slices=4),  # two whole GPUs
            job("bob", NOW - 100, None, gpus=(2,), slices=1),  # a quarter GPU
            job("bob", NOW - 40, NOW - 20, gpus=(3,), slices=2),  # half a GPU
        ]
        totals = gpu_seconds_by_user(records, NOW - 100, NOW, 4)
        assert totals == {"ann": 200.0, "bob": pytest.approx(25.0 + 10.0)}


class TestBusyPerMinute:
    def test_empty_has_one_zero_point_per_minute(self) -> None:
        points = busy_per_minute([], 4, 1, NOW)
        assert len(points) == 60
        assert all(p["busy"] == 0.0 for p in points)
        assert points[-1]["t"] == NOW - 30  # the current minute, last
        assert points[0]["t"] == NOW - 30 - 59 * 60
        assert all(b["t"] - a["t"] == 60 for a, b in itertools.pairwise(points))

    def test_job_across_minute_edges(self) -> None:
        minute = NOW - 30
        # From the middle of minute -3 to a quarter into minute -1, on one whole GPU.
        records = [job("ann", minute - 150, minute - 45)]
        by_t = {p["t"]: p["busy"] for p in busy_per_minute(records, 2, 1, NOW, minutes=5)}
        assert by_t[minute - 240] == 0.0
        assert by_t[minute - 180] == pytest.approx(0.5)
        assert by_t[minute - 120] == pytest.approx(1.0)
        assert by_t[minute - 60] == pytest.approx(0.25)
        assert by_t[minute] == 0.0

    def test_running_job_and_partial_current_minute(self) -> None:
        minute = NOW - 30
        # Started 10 s into the current minute (20 s elapsed of 30 so far), two GPUs.
        records = [job("ann", minute + 10, None, gpus=(0, 1), slices=1)]
        points = busy_per_minute(records, 2, 1, NOW, minutes=3)
        assert [p["busy"] for p in points[:-1]] == [0.0, 0.0]
        assert points[-1]["busy"] == pytest.approx(2 * 20 / 30)

    def test_started_before_window(self) -> None:
        records = [job("ann", NOW - 10_000, None, gpus=(0,), slices=2)]
        points = busy_per_minute(records, 1, 4, NOW, minutes=60)
        assert all(p["busy"] == pytest.approx(0.5) for p in points)

    def test_slices_add_up_and_are_capped_at_gpu_count(self) -> None:
        records = [job(u, NOW - 600, None, gpus=(0,), slices=1) for u in ("a", "b", "c")]
        points = busy_per_minute(records, 1, 4, NOW, minutes=2)
        assert [p["busy"] for p in points] == pytest.approx([0.75, 0.75])
        crowded = [job("a", NOW - 600, None, gpus=(0, 1), slices=1)]
        assert busy_per_minute(crowded, 1, 1, NOW, minutes=1)[0]["busy"] == 1.0

    def test_no_minutes(self) -> None:
        assert busy_per_minute([job("a", NOW - 60, None)], 1, 1, NOW, minutes=0) == []


def test_local_midnight() -> None:
    now = time.time()
    midnight = local_midnight(now)
    assert midnight <= now < midnight + 25 * 3600
    start = datetime.fromtimestamp(midnight)
    assert (start.hour, start.minute, start.second) == (0, 0, 0)
    assert start.date() == datetime.fromtimestamp(now).date()
