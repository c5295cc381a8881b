"""The view builders (broker and Slurm), one meaning of "finished", and refusal kinds to statuses."""

from __future__ import annotations

import signal
from dataclasses import replace

import pytest

from gpulane import errors
from gpulane.broker import views
from gpulane.broker.gpus import GpuReading
from gpulane.broker.policy import PolicyConfig, Waiting
from gpulane.broker.statuses import STATUS_OF, status_of
from gpulane.broker.store import JobRecord
from gpulane.display import status_table
from gpulane.jobs import JobState, is_finished
from gpulane.scheduler.base import JobUpdate
from gpulane.scheduler.slurm_parse import job_view as slurm_view
from gpulane.views import JobView, Snapshot

NOW = 1_000_000.0
GIB = 1024**3


def record(**changes: object) -> JobRecord:
    job = JobRecord(
        uid=1000,
        user="ann",
        name="train",
        gpus=1,
        slices=0,
        time_limit=600,
        mem=None,
        command=["python", "train.py"],
        submitted_at=NOW - 100,
        id=7,
    )
    for key, value in changes.items():
        setattr(job, key, value)
    return job


def view_of(job: JobRecord, viewer: str = "ann", **settings: object) -> JobView:
    config = PolicyConfig(**settings)  # type: ignore[arg-type]
    return views.job_view(job, viewer=viewer, now=NOW, config=config, gpu_memory=16 * GIB)


def test_a_queued_job_is_explained_and_has_no_times_yet() -> None:
    config = PolicyConfig(max_running_per_user=2)
    waiting = Waiting(position=3, reason="user_cap", eta=NOW + 60)
    view = views.job_view(
        record(), viewer="ann", now=NOW, config=config, gpu_memory=16 * GIB, waiting=waiting
    )
    assert view == {
        "id": 7,
        "user": "ann",
        "name": "train",
        "state": "queued",
        "gpus": 1,
        "slices": 0,
        "time_limit": 600,
        "mem": None,
        "submitted_at": NOW - 100,
        "started_at": None,
        "ended_at": None,
        "exit_status": None,
        "message": "",
        "assigned_gpus": [],
        "assigned_slices": None,
        "gpu_memory_limit": None,
        "gpu_memory_fraction": None,
        "ending": None,
        "position": 3,
        "eta": NOW + 60,
        "reason": "user_cap",
        "reason_text": "per-user cap: you already run 2 job(s)",
        "command": ["python", "train.py"],
    }


def test_only_the_owner_sees_the_command() -> None:
    assert "command" in view_of(record(), viewer="ann")
    assert "command" not in view_of(record(), viewer="bob")


def test_a_running_job_counts_from_its_start_and_an_ended_one_stops_counting() -> None:
    running = view_of(record(state=JobState.RUNNING, started_at=NOW - 50, assigned_gpus=[1]))
    assert (running["elapsed"], running["remaining"]) == (50, 550)
    assert "position" not in running
    ended = view_of(
        record(state=JobState.COMPLETED, started_at=NOW - 900, ended_at=NOW - 100, exit_status=0)
    )
    assert (ended["elapsed"], ended["remaining"]) == (800, 0.0)  # never negative


def test_a_slice_gets_its_share_of_the_gpu_memory_and_a_job_being_stopped_says_how_it_ends() -> (
    None
):
    sliced = record(slices=1, state=JobState.RUNNING, started_at=NOW, ending_state=JobState.TIMEOUT)
    view = view_of(sliced, slices_per_gpu=4)
    assert (view["gpu_memory_limit"], view["gpu_memory_fraction"]) == (4 * GIB, 0.25)
    assert view["ending"] == "timeout"
    # Whole GPUs, or a machine that does not split them: no cap.
    assert view_of(record(), slices_per_gpu=4)["gpu_memory_limit"] is None
    assert view_of(record(slices=1))["gpu_memory_limit"] is None


def test_reason_text_words_each_reason_and_passes_an_unknown_one_through() -> None:
    config = PolicyConfig(starvation_after=7200)
    assert views.reason_text("reserved", config) == (
        "GPUs are held for a job that has waited over 2:00:00"
    )
    assert views.reason_text("resources", config) == "waiting for a GPU to free up"
    assert views.reason_text("something_new", config) == "something_new"


def test_holders_are_the_running_jobs_and_each_gpu_row_lists_its_own() -> None:
    jobs = [
        record(id=1, state=JobState.RUNNING, started_at=NOW - 10, assigned_gpus=[0], user="ann"),
        record(id=2, state=JobState.RUNNING, started_at=NOW - 20, assigned_gpus=[1], user="bob"),
        record(id=3),  # queued: holds nothing
    ]
    holders = views.holders(jobs, NOW)
    assert [(h["job"], h["user"], h["elapsed"], h["remaining"]) for h in holders] == [
        (1, "ann", 10, 590),
        (2, "bob", 20, 580),
    ]
    reading = GpuReading(1, "Simulated GPU 1", "GPU-x", 16 * GIB, 0, 0, simulated=True)
    row = views.gpu_row(reading, 1, holders)
    assert [h["job"] for h in row["holders"]] == [2]
    assert (row["index"], row["uuid"], row["slices"]) == (1, "GPU-x", 1)


def test_exit_text_names_the_signal_or_the_status() -> None:
    assert views.exit_text(3) == "exited with status 3"
    assert views.exit_text(-signal.SIGKILL) == "killed by SIGKILL"
    assert views.exit_text(-200) == "killed by signal 200"


def test_slurm_views_carry_only_what_slurm_said_without_the_name_prefix() -> None:
    assert slurm_view(5, "queued", name="gpulane:train", job_dir="/j") == {
        "id": 5,
        "state": "queued",
        "name": "train",
        "job_dir": "/j",
    }
    assert slurm_view(6, "failed", message="gone", exit_status=1) == {
        "id": 6,
        "state": "failed",
        "message": "gone",
        "exit_status": 1,
    }
    assert slurm_view(7, "running", name="plain")["name"] == "plain"  # not ours: kept


@pytest.mark.parametrize("state", list(JobState))
def test_finished_means_one_thing(state: JobState) -> None:
    expected = state not in (JobState.QUEUED, JobState.RUNNING)
    assert is_finished(state.value) is expected
    assert state.finished is expected
    assert JobUpdate({"id": 1, "state": state.value}, [], NOW).finished is expected


def test_every_kind_of_refusal_has_its_status() -> None:
    kinds = {
        k for k in vars(errors).values() if isinstance(k, type) and issubclass(k, errors.Refused)
    }
    assert kinds - {errors.Refused} == set(STATUS_OF)  # a new kind needs its status here
    expected = {
        errors.InvalidRequest: 400,
        errors.NotAuthenticated: 401,
        errors.Forbidden: 403,
        errors.NotFound: 404,
        errors.Conflict: 409,
        errors.TooLarge: 413,
        errors.LimitReached: 429,
        errors.Unavailable: 503,
        errors.StateFolderFull: 503,
    }
    for kind, status in expected.items():
        assert status_of(kind("no")) == status


def test_a_refinement_of_a_kind_takes_its_status_and_a_bare_refusal_is_a_bad_request() -> None:
    class NoSuchAction(errors.NotFound):
        pass

    assert status_of(NoSuchAction("no action 'x'")) == 404
    assert status_of(errors.Refused("no")) == 400


def test_status_table_reads_a_snapshot() -> None:
    holders = views.holders(
        [record(id=1, state=JobState.RUNNING, started_at=NOW - 60, assigned_gpus=[0])], NOW
    )
    reading = GpuReading(0, "Simulated GPU 0", "GPU-0", 16 * GIB, None, None, simulated=True)
    queued = view_of(record(id=2, user="bob"))
    queued["position"], queued["eta"] = 1, None
    queued["reason_text"] = "waiting for a GPU to free up"
    snapshot: Snapshot = {
        "backend": "broker",
        "backend_reason": "embedded broker on this machine",
        "now": NOW,
        "user": "ann",
        "gpus": [views.gpu_row(reading, 1, holders)],
        "running": [],
        "queue": [queued],
    }
    lines = status_table(snapshot).splitlines()
    assert lines[0] == "back end: broker (embedded broker on this machine)"
    assert lines[3].startswith("0    Simulated GPU 0        16.0 GiB (sim)")
    assert "job 1 ann, running 01:00, 09:00 left" in lines[3]
    position, job, user, count, unit, limit, eta, *why = lines[-1].split()
    assert (position, job, user, f"{count} {unit}", limit, eta) == (
        "1", "2", "bob", "1 GPU(s)", "10:00", "unknown"
    )  # fmt: skip
    assert " ".join(why) == "waiting for a GPU to free up"


def test_each_waiting_reason_is_told_with_the_standing_behind_it() -> None:
    config = PolicyConfig(starvation_after=3600)
    hour = 3600.0
    head = Waiting(1, "resources", NOW, 0.4 * hour, 1.0, "alice", 3.2 * hour, 1.0)
    text = views.waiting_text(head, config, "bob", you=True, now=NOW)
    assert text == (
        "waiting for a GPU to free up; alice has used 3.2 GPU-hours recently, you 0.4: you go first"
    )
    behind = Waiting(2, "fair_share", NOW, 3.2 * hour, 1.0, "bob", 0.4 * hour, 1.0)
    text = views.waiting_text(behind, config, "alice", you=True, now=NOW)
    assert text.startswith(
        "fair share: bob has used 0.4 GPU-hours recently, you 3.2: bob goes first"
    )
    # Another user reads the owner's name; shares that differ are named.
    weighted = replace(behind, share=2.0)
    text = views.waiting_text(weighted, config, "alice", you=False, now=NOW)
    assert "bob has used 0.4 GPU-hours on a share of 1 recently" in text
    assert "alice 3.2 on a share of 2: bob goes first" in text
    held = Waiting(
        1, "held", NOW + 600, held_job=12, held_since=NOW - 2 * hour, held_until=NOW + 600
    )
    assert views.waiting_text(held, config, "bob", you=True, now=NOW).startswith(
        "waited 2:00:00 without a start, the longest: the GPUs it needs are held for it, "
        "free in 10:00 at the latest"
    )
    reserved = Waiting(3, "reserved", None, held_job=12, held_since=NOW - 2 * hour)
    assert views.waiting_text(reserved, config, "bob", you=True, now=NOW).startswith(
        "reserved for job 12, which has waited 2:00:00 without a start"
    )
    cap = Waiting(4, "user_cap", None)
    assert views.waiting_text(cap, PolicyConfig(max_running_per_user=2), "bob", True, NOW) == (
        "per-user cap: you already run 2 job(s)"
    )
