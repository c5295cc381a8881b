"""CUDA MPS's pure decisions (broker/mps.py): the auto rule, each job's environment, the
one-user-per-server rule, the folders' modes; and that a job's command gets the env."""

from __future__ import annotations

import pytest

from gpulane.broker import mps
from gpulane.broker.policy import PolicyConfig
from gpulane.broker.store import JobRecord
from gpulane.broker.views import job_view, memory_limit
from gpulane.jobs import JobState
from gpulane.scheduler.embedded import job_environment

UUIDS = {0: "GPU-aaaa", 1: "GPU-bbbb"}
GiB = 1024**3


def _plan(mode: str = "auto", **changes: object) -> mps.MpsSettings:
    args: dict[str, object] = {
        "control": "/usr/bin/nvidia-cuda-mps-control",
        "uuids": UUIDS,
        "mig": {},
        "is_root": True,
    }
    args.update(changes)
    return mps.plan(mode, **args)  # type: ignore[arg-type]


def test_auto_is_on_for_each_gpu_not_in_mig_mode_where_root_and_the_daemon_is_found() -> None:
    settings = _plan(mig={1: True})
    assert dict(settings.gpus) == {0: "GPU-aaaa"}
    assert settings.line().startswith("MPS: on for GPU 0 ")


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"control": None}, "MPS: off (nvidia-cuda-mps-control not found)"),
        ({"is_root": False}, "MPS: off (the broker is not root)"),
        ({"uuids": {}}, "MPS: off (no NVIDIA GPU here)"),
        ({"mig": {0: True, 1: True}}, "MPS: off (every GPU is in MIG mode)"),
    ],
)
def test_auto_is_off_with_the_reason_and_on_refuses_to_start(
    changes: dict[str, object], why: str
) -> None:
    settings = _plan("auto", **changes)
    assert not settings.enabled and settings.line() == why
    with pytest.raises(mps.MpsError, match="or start with --mps off"):
        _plan("on", **changes)


def test_off_is_off_even_where_mps_could_run() -> None:
    settings = _plan("off")
    assert not settings.enabled and settings.line() == "MPS: off (--mps off)"


def test_the_pinned_limit_is_the_granted_size_in_whole_mib_on_device_0() -> None:
    assert mps.pinned_limit(8 * GiB) == "0=8192M"
    assert mps.pinned_limit(8 * GiB + 1023) == "0=8192M"  # never above what was given
    assert mps.pinned_limit(100) == "0=1M"


def _job(**changes: object) -> JobRecord:
    job = JobRecord(
        uid=1001, user="alice", name="train", gpus=1, slices=1, time_limit=3600,
        mem=None, command=["python"], submitted_at=0.0,
    )  # fmt: skip
    job.state, job.started_at, job.assigned_gpus = JobState.RUNNING, 1.0, [1]
    for key, value in changes.items():
        setattr(job, key, value)
    job.id = 7
    return job


def test_a_slice_jobs_env_names_its_gpu_by_uuid_its_daemon_and_its_share() -> None:
    config = PolicyConfig(slices_per_gpu=4)
    job = _job()
    limit = memory_limit(job, config, 16 * GiB)
    assert limit == 4 * GiB
    gpu = mps.shared_gpu(job.assigned_gpus, limit)
    assert gpu == 1
    env = mps.client_env(_plan(base="/run/x"), gpu, limit)
    assert env == {
        "CUDA_VISIBLE_DEVICES": "GPU-bbbb",
        "CUDA_MPS_PIPE_DIRECTORY": "/run/x/gpu1/pipe",
        "CUDA_MPS_LOG_DIRECTORY": "/run/x/gpu1/log",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=4096M",
    }
    # The owner's view carries it, and the command's environment takes it (UUID, not index).
    view = job_view(job, viewer="alice", now=2.0, config=config, gpu_memory=16 * GiB, mps_env=env)
    assert job_environment(view)["CUDA_VISIBLE_DEVICES"] == "GPU-bbbb"
    assert job_environment(view)["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=4096M"
    other = job_view(job, viewer="bob", now=2.0, config=config, gpu_memory=16 * GiB, mps_env=env)
    assert "mps_env" not in other


def test_a_gpu_mem_job_gets_its_request_as_the_limit() -> None:
    job = _job(gpu_mem=10 * GiB, slices=0)
    limit = memory_limit(job, PolicyConfig(slices_per_gpu=1), 80 * GiB)
    assert limit is not None and mps.pinned_limit(limit) == "0=10240M"


def test_whole_gpus_without_a_memory_request_get_no_mps_and_no_pinned_limit() -> None:
    whole = _job(slices=0, assigned_gpus=[0, 1], gpus=2)
    config = PolicyConfig(slices_per_gpu=1)
    limit = memory_limit(whole, config, 16 * GiB)
    assert limit is None and mps.shared_gpu(whole.assigned_gpus, limit) is None
    assert mps.shared_gpu([0], None) is None
    view = job_view(whole, viewer="alice", now=2.0, config=config, gpu_memory=16 * GiB)
    env = job_environment(view)
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert not any(key.startswith("CUDA_MPS_") for key in env)


def test_one_mps_server_serves_one_user_at_a_time() -> None:
    assert mps.admits({}, 1001)
    assert mps.admits({7: 1001, 8: 1001}, 1001)
    assert not mps.admits({7: 1001}, 1002)


def test_the_daemon_sees_only_its_gpu_by_uuid_and_no_inherited_mps_settings() -> None:
    pipe, log = mps.folders("/run/x", 0)
    env = mps.daemon_env(
        {"PATH": "/usr/bin", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=1M"}, "GPU-aaaa", pipe, log
    )
    assert env == {
        "PATH": "/usr/bin",
        "CUDA_VISIBLE_DEVICES": "GPU-aaaa",
        "CUDA_MPS_PIPE_DIRECTORY": "/run/x/gpu0/pipe",
        "CUDA_MPS_LOG_DIRECTORY": "/run/x/gpu0/log",
    }


def test_folder_modes_let_clients_through_but_nobody_else_write_or_list() -> None:
    assert mps.PIPE_MODE == 0o711 and mps.BASE_MODE == 0o711 and mps.LOG_MODE == 0o700
    ok = mps.private_dir_problem(0o711, 0, True, False, 0o711)
    assert ok == ""
    assert "owned by uid 1001" in mps.private_dir_problem(0o711, 1001, True, False, 0o711)
    assert "others could write" in mps.private_dir_problem(0o777, 0, True, False, 0o711)
    assert "not a folder" in mps.private_dir_problem(0o777, 0, False, True, 0o711)
