"""The Slurm back end on a real one-node Slurm (Debian's slurm-wlm), as two real Unix users."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.users import wait_for

ALICE, BOB = "gpl-alice", "gpl-bob"


def names_in_queue(cluster) -> list[tuple[str, str, str]]:
    return [(user, state, name) for _, user, state, name in cluster.squeue()]


@pytest.fixture(scope="module")
def timed_out_job(slurm_cluster):
    """Slurm's time limits have minute granularity: start the one-minute job first, check it last."""
    proc = slurm_cluster.gpulane(
        ALICE, "run", "--time", "1", "--name", "overtime", "--", "sleep", "600"
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def test_status_names_the_back_end_and_why(slurm_cluster, timed_out_job):
    result = slurm_cluster.call(ALICE, "status")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("back end: slurm (configured: backend = slurm)")


def test_run_streams_output_and_returns_the_exit_status(slurm_cluster, timed_out_job):
    wait_for(lambda: ("gpl-alice", "RUNNING", "gpulane:overtime") in names_in_queue(slurm_cluster), 30,
             what="the overtime job to hold the GPU")  # fmt: skip
    proc = slurm_cluster.gpulane(
        BOB, "run", "--name", "stream", "--", "sh", "-c",
        'echo "start gpus=$CUDA_VISIBLE_DEVICES as $(id -un)"; sleep 2; echo end; exit 3',
    )  # fmt: skip
    # It waits behind alice's job, with the real reason and holder from squeue.
    wait_for(lambda: ("gpl-bob", "PENDING", "gpulane:stream") in names_in_queue(slurm_cluster), 30,
             what="bob's job to pend")  # fmt: skip
    # Alice's job runs on until its one-minute limit; bob's then gets the GPU.
    out, err = proc.communicate(timeout=150)
    assert proc.returncode == 3, err
    assert out.splitlines() == [f"start gpus=0 as {BOB}", "end"]
    assert "position 1 in the queue" in err
    assert f"{ALICE}, running" in err
    assert "waiting for GPUs to free up" in err
    assert "exited with status 3" in err


def test_time_limit_ends_the_job_with_a_clear_message(slurm_cluster, timed_out_job):
    _out, err = timed_out_job.communicate(timeout=150)
    assert timed_out_job.returncode == 124, err
    assert "GPU time limit 01:00 reached; ask for more with --time" in err


def test_interrupt_cancels_and_others_cannot_cancel_or_read(slurm_cluster):
    proc = slurm_cluster.gpulane(
        ALICE, "run", "--name", "mine", "--", "sh", "-c", "echo up; sleep 300"
    )
    wait_for(lambda: ("gpl-alice", "RUNNING", "gpulane:mine") in names_in_queue(slurm_cluster), 30,
             what="alice's job to run")  # fmt: skip
    job_id = next(i for i, u, s, n in slurm_cluster.squeue() if n == "gpulane:mine")
    refused = slurm_cluster.call(BOB, "cancel", job_id)
    assert refused.returncode == 1
    assert f"job {job_id} belongs to another user" in refused.stderr
    # Her job folder is private: bob can read neither the script nor the output.
    jobs = slurm_cluster.homes / ALICE / ".gpulane" / "jobs"
    peek = subprocess.run(
        ["setpriv", f"--reuid={BOB}", f"--regid={BOB}", "--init-groups", "--", "ls", str(jobs)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert peek.returncode != 0 and "Permission denied" in peek.stderr
    proc.send_signal(signal.SIGINT)
    _out, _err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    wait_for(lambda: not any(n == "gpulane:mine" for _, _, _, n in slurm_cluster.squeue()), 30,
             what="the job to leave the queue")  # fmt: skip


def test_a_gpu_cell_runs_on_slurm_with_the_notebooks_variables(slurm_cluster, kernels):
    k = kernels(ALICE, None, env=slurm_cluster.user_env(ALICE))
    assert k.execute("base = 40\ndef bump(v):\n    return v + 2").status == "ok"
    cell = k.execute(
        "%%gpu --time 5m\n"
        "import os, time\n"
        "print('on slurm job', os.environ['SLURM_JOB_ID'], 'gpus', os.environ['CUDA_VISIBLE_DEVICES'], flush=True)\n"
        "time.sleep(1.5)\n"
        "answer = bump(base)\n",
        timeout=120,
    )
    assert cell.status == "ok", cell.messages
    assert "on slurm job" in cell.stream() and cell.stream().splitlines()[0].endswith("gpus 0")
    first = next(
        t for t, kind, c in cell.messages if kind == "stream" and "on slurm job" in c["text"]
    )
    assert cell.messages[-1][0] - first > 1.0  # the line arrived while the cell still ran
    assert any("runs on" in text for text in cell.texts())
    assert k.execute("print(answer)").stream().strip() == "42"
    error = k.execute("%%gpu\n1/0", timeout=120).error()
    assert error is not None and error["ename"] == "ZeroDivisionError"


def test_a_cold_worker_that_would_hang_at_exit_ends_and_frees_its_slurm_gpu(slurm_cluster, kernels):
    from tests.integration.test_cold_worker import HOLDS_THE_RELAY_LOCK, STUCK_IN_TEARDOWN

    k = kernels(ALICE, None, env=slurm_cluster.user_env(ALICE))
    # A daemon thread holding the output relay's lock at exit (the hang seen): no hang now.
    cell = k.execute("%%gpu --time 5m\n" + HOLDS_THE_RELAY_LOCK, timeout=120)
    assert cell.status == "ok", cell.messages
    wait_for(lambda: slurm_cluster.squeue() == [], 10, what="the allocation to end")
    # A teardown that never returns: the worker's watchdog ends it, and the allocation.
    started = time.monotonic()
    cell = k.execute("%%gpu --time 5m\n" + STUCK_IN_TEARDOWN, timeout=120)
    error = cell.error()
    assert error is not None and error["ename"] == "WorkerExited", cell.messages
    assert "x" in cell.stream() and "Timeout" in cell.stream("stderr"), cell.messages
    wait_for(lambda: slurm_cluster.squeue() == [], 10, what="the allocation to end")
    assert time.monotonic() - started < 30


def test_the_cell_waits_through_a_slurmctld_restart(slurm_cluster):
    from tools.slurmlocal import paths, read_pid, slurm_env

    proc = slurm_cluster.gpulane(
        BOB, "run", "--name", "survivor", "--", "sh", "-c", "sleep 4; echo survived"
    )
    wait_for(lambda: ("gpl-bob", "RUNNING", "gpulane:survivor") in names_in_queue(slurm_cluster), 30,
             what="the job to run")  # fmt: skip
    folder = Path(slurm_cluster.folder)
    pid = read_pid(paths(folder)["ctld_pid"], "slurmctld")
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 20, what="slurmctld to stop")
    time.sleep(1)
    subprocess.run(["slurmctld"], env=slurm_env(folder), check=True)  # no -c: keep its state
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == "survived"


def test_interrupting_a_gpu_cell_on_slurm_cancels_its_job(slurm_cluster, kernels):
    k = kernels(BOB, None, env=slurm_cluster.user_env(BOB))
    assert k.execute("keep = 'intact'").status == "ok"
    msg_id = k.submit("%%gpu\nimport time\nprint('started', flush=True)\ntime.sleep(300)")
    k.wait_for_output(msg_id, "started", timeout=120)
    assert [u for _, u, s, _ in slurm_cluster.squeue() if s == "RUNNING"] == [BOB]
    k.km.interrupt_kernel()
    result = k.collect(msg_id, timeout=60)
    assert result.reply["ename"] == "KeyboardInterrupt"
    wait_for(lambda: slurm_cluster.squeue() == [], 30, what="the job to leave the queue")
    assert k.execute("print(keep)").stream().strip() == "intact"


def test_a_gpu_session_on_slurm_keeps_state_and_is_released(slurm_cluster, kernels):
    k = kernels(ALICE, None, env=slurm_cluster.user_env(ALICE))
    start = k.execute("%gpu session start --idle 10m --time 5m", timeout=120)
    assert start.status == "ok", start.messages
    assert [u for _, u, s, _ in slurm_cluster.squeue() if s == "RUNNING"] == [ALICE]
    assert k.execute("%%gpu --session --no-return\nweights = [1]", timeout=60).status == "ok"
    second = k.execute("%%gpu --session\nweights.append(2)\ncount = len(weights)", timeout=60)
    assert second.status == "ok", second.messages
    assert k.execute("print(count)").stream().strip() == "2"
    assert k.execute("%gpu session stop", timeout=60).status == "ok"
    wait_for(lambda: slurm_cluster.squeue() == [], 30, what="the session's allocation to end")


def test_a_detached_submit_runs_its_argv_without_a_shell(slurm_cluster, tmp_path):
    from gpulane.jobs import Request
    from gpulane.scheduler.slurm import SlurmScheduler, SlurmSettings

    scheduler = SlurmScheduler(
        SlurmSettings(job_dir=tmp_path / "jobs"), env={**os.environ, **slurm_cluster.env}
    )
    marker = tmp_path / "marker"
    # An argument with shell syntax in it must arrive as one literal argument.
    job = scheduler.submit(
        Request(name="detached", command=("/bin/touch", str(marker) + " ;$(id)"))
    )
    assert (Path(job["job_dir"]).stat().st_mode & 0o777) == 0o700
    wait_for(
        lambda: scheduler.job(int(job["id"]))["state"] == "completed",
        60,
        what="the detached job to end",
    )
    assert Path(str(marker) + " ;$(id)").exists()
