"""--gpu-mem as the magic, `gpulane run` and the job's environment read it (issue 14)."""

from __future__ import annotations

import pytest

from gpulane.cli import build_parser
from gpulane.errors import OptionError
from gpulane.jobs import build_request
from gpulane.kernel.memory_caps import oom_hint
from gpulane.kernel.options import parse_cell_options, parse_session_options
from gpulane.scheduler.embedded import job_environment
from gpulane.scheduler.slurm import SlurmScheduler

GiB = 1024**3


def test_the_magic_and_its_key_value_form_ask_for_gpu_memory() -> None:
    assert parse_cell_options("--gpu-mem 10G").request.gpu_mem == 10 * GiB
    assert parse_cell_options("gpu_mem=512M --time 5m").request.gpu_mem == 512 * 1024**2
    assert parse_session_options("--gpu-mem 2G").cell.request.gpu_mem == 2 * GiB
    with pytest.raises(OptionError, match=r"^%%gpu: argument --slices: not allowed with"):
        parse_cell_options("--gpu-mem 10G --slices 2")
    with pytest.raises(OptionError, match=r"^%%gpu: --gpu-mem 'lots' is not a size"):
        parse_cell_options("--gpu-mem lots")


def test_gpulane_run_reads_gpu_mem() -> None:
    args = build_parser().parse_args(["run", "--gpu-mem", "8G", "--", "python", "train.py"])
    assert args.gpu_mem == "8G"
    with pytest.raises(OptionError, match="leave out --gpus and --slices"):
        build_request(gpus="2", gpu_mem="8G")


def test_the_grant_sets_the_framework_caps_from_the_memory_given() -> None:
    env = job_environment(
        {
            "id": 7,
            "state": "running",
            "assigned_gpus": [0],
            "gpu_memory_limit": 8 * GiB,
            "gpu_memory_fraction": 0.25,
        }
    )
    assert env["GPULANE_GPU_MEMORY_LIMIT"] == str(8 * GiB)
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.2500"
    assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    whole = job_environment({"id": 8, "state": "running", "assigned_gpus": [1]})
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in whole


def test_the_oom_hint_says_what_was_given_and_how_to_ask() -> None:
    env = {"GPULANE_GPU_MEMORY_LIMIT": str(8 * GiB), "GPULANE_GPU_MEMORY_FRACTION": "0.25"}
    hint = oom_hint(type("OutOfMemoryError", (Exception,), {}), "CUDA out of memory", env)
    assert hint is not None and "8.0 GiB" in hint and "--gpu-mem" in hint


def test_slurm_refuses_gpu_mem_rather_than_give_a_whole_gpu(tmp_path) -> None:
    scheduler = SlurmScheduler.__new__(SlurmScheduler)
    with pytest.raises(OptionError, match="not supported on Slurm"):
        scheduler._job_options(build_request(gpu_mem="8G", command=["true"]), {})
