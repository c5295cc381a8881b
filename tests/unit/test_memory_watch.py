"""The watchdog's loop: a failing reading is logged once and the loop goes on; which
job a process belongs to comes from /proc, not from a client (issue 14)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time
from typing import Any

import pytest

from gpulane.broker import procs
from gpulane.broker.memory_watch import MemoryWatch, WatchSettings, file_reader, job_of
from gpulane.broker.store import JobRecord
from gpulane.broker.watchdog import ProcessReading
from gpulane.jobs import JobState

GiB = 1024**3


def _job(job_id: int, cmd: subprocess.Popen[bytes] | None, uid: int = 0) -> JobRecord:
    return JobRecord(
        uid=uid,
        user="alice",
        name="j",
        gpus=1,
        slices=0,
        time_limit=60,
        mem=None,
        command=[],
        submitted_at=0.0,
        state=JobState.RUNNING,
        started_at=0.0,
        assigned_gpus=[0],
        gpu_mem=GiB,
        cmd_pid=cmd.pid if cmd else None,
        cmd_start=procs.start_time(cmd.pid) if cmd else None,
        id=job_id,
    )


def test_a_failing_reading_is_logged_once_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    def read() -> list[ProcessReading]:
        calls.append(1)
        if len(calls) <= 3:
            raise OSError("NVML is gone for a moment")
        return []

    async def run() -> None:
        watch = MemoryWatch(
            read,
            WatchSettings(interval=0.01),
            lambda: [],
            lambda job: None,
            lambda job_id, why: None,
            lambda ids: None,
            lambda: False,
        )
        watch.start()
        while len(calls) < 6:
            await asyncio.sleep(0.01)
        watch.stop()

    with caplog.at_level(logging.ERROR, "gpulane.broker.memory"):
        asyncio.run(run())
    failed = [r for r in caplog.records if "GPU memory reading failed" in r.getMessage()]
    assert len(failed) == 1 and len(calls) >= 6


def test_a_process_is_its_jobs_by_group_or_descent_and_a_stranger_is_no_ones() -> None:
    command = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"], start_new_session=True)
    stranger = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        job = _job(1, command)
        for _ in range(200):
            children = procs_children(command.pid)
            if len(children) == 2:
                break
            time.sleep(0.01)
        assert len(children) == 2
        assert all(job_of(pid, [job]) is job for pid in [command.pid, *children])
        assert job_of(stranger.pid, [job]) is None
        # A PID that was the command once but is another process now: no one's.
        moved = _job(2, command)
        moved.cmd_start = "1"
        assert job_of(command.pid, [moved]) is None
    finally:
        for proc in (command, stranger):
            os.killpg(proc.pid, 9)
            proc.wait()


def procs_children(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and procs.parent_pid(int(name)) == pid:
            found.append(int(name))
    return found


def test_the_readings_file_is_read_as_nvml_would_report(tmp_path) -> None:
    path = tmp_path / "readings.json"
    read = file_reader(str(path))
    assert read() == []  # no file yet: nothing on the GPUs
    path.write_text('[{"gpu": 1, "pid": 42, "used": 1024}]')
    assert read() == [ProcessReading(1, 42, 1024)]
    path.write_text('{"gpu": 1}')
    with pytest.raises(ValueError, match="not a JSON list"):
        read()


def test_the_watchdogs_options() -> None:
    from gpulane.broker.app import BrokerApp
    from gpulane.errors import OptionError

    app = BrokerApp()
    app.initialize(["--memory-watch-grace", "3s", "--gpu-mem-slack", "0"])
    assert (app.memory_watch_grace, app.gpu_mem_slack, app.stray_gpu_processes) == (3, 0, "auto")
    with pytest.raises(OptionError, match=r"^--stray-gpu-processes 'kill' is not a choice"):
        BrokerApp().initialize(["--stray-gpu-processes", "kill"])


def test_a_job_being_stopped_owns_its_processes_and_is_not_warned_again() -> None:
    command = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        job = _job(1, command, uid=os.getuid())
        readings = [ProcessReading(0, command.pid, 4 * GiB)]  # over its 1 GiB
        seen: dict[str, list[Any]] = {"ends": [], "changed": []}
        watch = MemoryWatch(
            lambda: readings,
            WatchSettings(grace=0.0, slack=0, strays="end"),
            lambda: [job],
            lambda j: j.gpu_mem,
            lambda job_id, why: seen["ends"].append((job_id, why)),
            lambda ids: seen["changed"].append(ids),
            lambda: True,
        )
        watch.check(0.0)
        assert (
            watch.of(1) == (4 * GiB, watch.warnings[1])
            and "4.0 GiB of the 1.0 GiB" in (watch.warnings[1])
        )
        job.ending_state = JobState.FAILED  # the broker revoked it: SIGTERM, then the grace
        watch.check(1.0)
        assert watch.strays == [] and command.poll() is None  # its own, not a stray to kill
        assert seen["ends"] == [] and 1 not in watch.warnings
    finally:
        command.kill()
        command.wait()
