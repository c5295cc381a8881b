"""The Slurm back end: Slurm queues, shares fairly, accounts and confines GPUs; gpulane watches.

Everything goes through Slurm's own commands, as the user, with argv lists:
``srun`` runs a job and streams its output back (``run``), ``sbatch`` submits
one to run detached (``submit``: the command travels as the batch script's
arguments, never as a shell string, in a private 0700 folder under
``~/.gpulane/jobs``), one ``squeue`` per refresh for every job of the partition
(position, start estimate, holders and reasons all come from it), ``scancel``,
and ``sacct`` or ``scontrol`` for the final state.
"""

from __future__ import annotations

import codecs
import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from gpulane.jobs import OptionError, Request, format_duration, is_finished
from gpulane.scheduler import slurm_parse as sp
from gpulane.scheduler.base import (
    Holder,
    JobUpdate,
    JobView,
    Launcher,
    Outcome,
    Scheduler,
    SchedulerError,
    SchedulerUnavailable,
    Snapshot,
    UpdateCallback,
)
from gpulane.scheduler.slurm_parse import JOB_NAME_PREFIX
from gpulane.scheduler.spawn import spawn_command
from gpulane.views import GpuRow

BATCH_SCRIPT = '#!/bin/sh\n# written by gpulane: run the job\'s argv as given\nexec "$@"\n'
OUTAGE_WINDOW = 180.0  # keep waiting this long while slurmctld restarts


def _default_job_dir() -> Path:
    return Path.home() / ".gpulane" / "jobs"


@dataclass(frozen=True)
class SlurmSettings:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    job_dir: Path = field(default_factory=_default_job_dir)
    poll_min: float = 0.2  # first refresh interval; doubles while nothing changes
    poll_max: float = 2.0


class SlurmScheduler(Scheduler):
    backend = "slurm"
    local_launch = False

    def __init__(
        self, settings: SlurmSettings | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        self.settings = settings or SlurmSettings()
        self.env = dict(env if env is not None else os.environ)
        self._accounting: bool | None = None

    # ------------------------------------------------------------------ commands

    def _slurm(self, argv: list[str], timeout: float = 30) -> str:
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                env=self.env,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError:
            raise SchedulerUnavailable(f"{argv[0]} not found: is Slurm installed here?") from None
        except subprocess.TimeoutExpired:
            raise SchedulerUnavailable(f"{argv[0]} did not answer within {timeout:.0f} s") from None
        if done.returncode != 0:
            message = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            if "contact slurm controller" in message or "Socket timed out" in message:
                raise SchedulerUnavailable(f"Slurm's controller does not answer: {message}")
            raise SchedulerError(message.removeprefix(f"{Path(argv[0]).name}: ").strip())
        return done.stdout

    def _rows(self) -> list[sp.SqueueRow]:
        argv = ["squeue", "-h", "-t", "PD,R,CG,CF,S", "-o", sp.SQUEUE_FORMAT, "--sort=-p,i"]
        if self.settings.partition:
            argv += ["-p", self.settings.partition]
        return sp.parse_squeue(self._slurm(argv))

    # ------------------------------------------------------------------ the interface

    def submit(self, request: Request, env: Mapping[str, str] | None = None) -> JobView:
        job_dir = self._new_job_dir()
        job_id = self._sbatch(request, job_dir, env or {})
        return sp.job_view(job_id, "queued", name=request.name, job_dir=str(job_dir))

    def _new_job_dir(self) -> Path:
        base = self.settings.job_dir
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        return Path(tempfile.mkdtemp(prefix="job-", dir=base))  # 0700: only the user reads it

    def _sbatch(self, request: Request, job_dir: Path, env: Mapping[str, str]) -> int:
        script = job_dir / "job.sh"
        script.write_text(BATCH_SCRIPT)
        script.chmod(0o700)
        argv = [
            "sbatch", "--parsable", f"--output={job_dir}/stdout", f"--error={job_dir}/stderr",
            *self._job_options(request, env),
        ]  # fmt: skip
        argv += [str(script), *request.command]
        out = self._slurm(argv).strip()
        try:
            return int(out.split(";")[0])
        except ValueError:
            raise SchedulerError(f"sbatch answered {out!r} instead of a job number") from None

    def job(self, job_id: int) -> JobView:
        rows = self._rows()
        row = next((r for r in rows if r.job_id == job_id), None)
        return self._view(row, rows, time.time()) if row else self._final(job_id)

    def cancel(self, job_id: int) -> JobView:
        try:
            self._slurm(["scancel", str(job_id)])
        except SchedulerError as error:
            if "denied" in str(error).lower():
                raise SchedulerError(
                    f"job {job_id} belongs to another user; only they or an admin may cancel it"
                ) from None
            raise
        return self.job(job_id)

    def snapshot(self) -> Snapshot:
        now = time.time()
        rows = self._rows()
        holders = [
            sp.holder(r) for r in rows if r.state in ("RUNNING", "COMPLETING") and r.gpu_request
        ]
        nodes: dict[str, list[Holder]] = {}
        for holder in holders:
            nodes.setdefault(holder["node"], []).append(holder)
        pending = [r for r in rows if r.state == "PENDING"]
        gpus: list[GpuRow] = [
            {
                "index": node,
                "name": f"Slurm node {node}",
                "memory_total": None,
                "memory_used": None,
                "utilization": None,
                "simulated": False,
                "slices": 1,
                "holders": hs,
            }
            for node, hs in sorted(nodes.items())
        ]
        return {
            "backend": "slurm",
            "backend_reason": self.reason,
            "now": now,
            "user": _me(),
            "gpus": gpus,
            "running": [
                self._view(r, rows, now) for r in rows if r.state in ("RUNNING", "COMPLETING")
            ],
            "queue": [self._view(r, rows, now) for r in pending],
        }

    def updates(self, job_id: int) -> Iterator[JobUpdate]:
        delay = self.settings.poll_min
        last: Any = None
        down_since: float | None = None
        while True:
            try:
                rows = self._rows()
                down_since = None
            except SchedulerUnavailable:
                # slurmctld restarts: keep the last view and try again, for a while.
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > OUTAGE_WINDOW:
                    raise
                time.sleep(min(delay, 1.0))
                continue
            now = time.time()
            row = next((r for r in rows if r.job_id == job_id), None)
            if row is None or is_finished(sp.gpulane_state(row.state)):
                yield JobUpdate(self._final(job_id), [], now)
                return
            view = self._view(row, rows, now)
            holders = [
                sp.holder(r)
                for r in rows
                if r.state == "RUNNING" and r.gpu_request and r.partition == row.partition
            ]
            signature = (view["state"], view.get("position"), view.get("eta"), view.get("reason"),
                         [(h["job"], h["user"]) for h in holders])  # fmt: skip
            if signature != last:
                last, delay = signature, self.settings.poll_min
                yield JobUpdate(view, holders, now)
            else:
                delay = min(delay * 2, self.settings.poll_max)  # back off while nothing changes
            time.sleep(delay)

    def run(
        self,
        request: Request,
        on_update: UpdateCallback | None = None,
        stdout: IO[bytes] | int | None = None,
        stderr: IO[bytes] | int | None = None,
        launcher: Launcher | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Outcome:
        """Run the command as one Slurm job through ``srun``, which streams its output here.

        ``srun`` rather than ``sbatch``: its step starts in tens of milliseconds where a
        batch script takes about a second (docs/benchmarks.md), its output needs no
        files, and the allocation ends with it, so a client that dies frees the GPU.
        """
        marker = f"gpulane-{uuid.uuid4().hex[:16]}"  # finds our job in squeue
        # Inside an allocation (a server that is itself a Slurm job), srun would start a
        # step of that allocation; without its SLURM_* variables it asks for a job of its own.
        srun_env = {
            k: v for k, v in self.env.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"
        }
        proc = spawn_command(
            self._srun_argv(request, marker, env or {}),
            srun_env,
            stdout=stdout,
            stderr=subprocess.PIPE,
            death_signal=signal.SIGTERM,  # srun cancels its allocation on SIGTERM
        )
        relay = _StderrRelay(proc, stderr)
        job_id: int | None = None
        final: JobView | None = None
        try:
            job_id = self._find_job(marker, proc, relay)
            for update in self.updates(job_id):
                if on_update:
                    on_update(update)
                if update.finished:
                    final = update.job
        except KeyboardInterrupt:
            if job_id is not None:
                self._interrupt(job_id)
            _stop(proc)
            raise
        finally:
            if proc.poll() is None and final is None:
                _stop(proc)
        status = _wait(proc)
        relay.join()
        assert final is not None
        if final["state"] == "timeout":
            return Outcome(124, final)
        exit_status = final.get("exit_status")
        return Outcome(int(exit_status if exit_status is not None else status), final)

    def _srun_argv(self, request: Request, marker: str, env: Mapping[str, str]) -> list[str]:
        options = self._job_options(request, env)
        return [
            "srun",
            "--quiet",
            f"--comment={marker}",
            "--ntasks=1",
            *options,
            "--",
            *request.command,
        ]

    def _job_options(self, request: Request, env: Mapping[str, str]) -> list[str]:
        """The options sbatch and srun share: name, GPUs, limits, placement, environment."""
        if request.gpu_mem is not None:  # never a whole GPU as if nothing had been asked
            raise OptionError(
                "--gpu-mem is not supported on Slurm: ask for --slices K (GPU shards) or --gpus N"
            )
        gres = f"--gres=shard:{request.slices}" if request.slices else f"--gres=gpu:{request.gpus}"
        options = [f"--job-name={JOB_NAME_PREFIX}{request.name}", gres, f"--chdir={os.getcwd()}"]
        if request.time_limit:
            options.append(f"--time={math.ceil(request.time_limit / 60)}")
        if request.mem:
            options.append(f"--mem={math.ceil(request.mem / 1024**2)}M")
        for option, value in (
            ("partition", self.settings.partition),
            ("account", self.settings.account),
            ("qos", self.settings.qos),
        ):
            if value:
                options.append(f"--{option}={value}")
        # Extra variables name files and addresses, never secrets; commas would split
        # --export, so such values are left out rather than mangled.
        exports = [f"{k}={v}" for k, v in env.items() if "," not in v]
        options.append("--export=" + ",".join(["ALL", *exports]))
        return options

    def _find_job(self, marker: str, proc: subprocess.Popen[bytes], relay: _StderrRelay) -> int:
        """The job number of our srun, from its comment in squeue (our own jobs only)."""
        delay = 0.02
        me = _me()
        while True:
            with contextlib.suppress(SchedulerUnavailable):
                for row in self._rows():
                    # Comments are anyone's to read and to copy: another user's job with
                    # our marker (sorted first by a higher priority) is never ours.
                    if row.comment == marker and row.user == me:
                        return row.job_id
            if proc.poll() is not None:
                relay.join()
                raise SchedulerError(
                    f"srun refused the job: {relay.last_line() or f'exit status {proc.returncode}'}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    # ------------------------------------------------------------------ helpers

    def _interrupt(self, job_id: int) -> None:
        """Ctrl-C: SIGINT to the job's processes first (they may save work), then cancel."""
        with contextlib.suppress(SchedulerError):
            self._slurm(["scancel", "--signal=INT", "--full", str(job_id)])
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if is_finished(self.job(job_id)["state"]):
                    return
                time.sleep(0.2)
        with contextlib.suppress(SchedulerError):
            self._slurm(["scancel", str(job_id)])

    def _view(self, row: sp.SqueueRow, rows: list[sp.SqueueRow], now: float) -> JobView:
        state = sp.gpulane_state(row.state)
        kind, count = row.gpu_request or ("gpu", 0)
        view = sp.job_view(
            row.job_id,
            state,
            user=row.user,
            name=row.name,
            gpus=count if kind == "gpu" else 1,
            slices=count if kind == "shard" else 0,
            time_limit=row.time_limit,
            elapsed=row.elapsed,
            remaining=row.remaining,
            assigned_gpus=[],
            node=row.nodes,
            message="",
            ending="stopping" if row.state == "COMPLETING" else None,
        )
        if state == "queued":
            competing = [
                r
                for r in rows
                if r.state == "PENDING" and r.partition == row.partition and r.gpu_request
            ]
            position = next((i for i, r in enumerate(competing, 1) if r.job_id == row.job_id), None)
            view["position"] = position
            view["eta"] = row.start if row.start and row.start >= now - 1 else None
            view["reason"] = row.reason
            view["reason_text"] = sp.reason_text(row.reason)
        return view

    def _final(self, job_id: int) -> JobView:
        """The end of a job that left the queue: sacct where accounting runs, else scontrol."""
        record: dict[str, str] = {}
        if self._has_accounting():
            with contextlib.suppress(SchedulerError):
                found = sp.parse_sacct(
                    self._slurm(
                        ["sacct", "-X", "-n", "-P", "-j", str(job_id), "-o", "State,ExitCode"]
                    )
                )
                if found:
                    record = {"JobState": found[0], "ExitCode": found[1]}
        if not record:
            with contextlib.suppress(SchedulerError):
                record = sp.parse_key_values(
                    self._slurm(["scontrol", "show", "job", "-o", str(job_id)])
                )
        slurm_state = record.get("JobState", "")
        exit_code = record.get("ExitCode", "0:0")
        limit = sp.parse_slurm_time(record.get("TimeLimit", ""))
        if not slurm_state:
            return sp.job_view(
                job_id, "failed", message="Slurm no longer knows this job", exit_status=1
            )
        return sp.job_view(
            job_id,
            sp.gpulane_state(slurm_state),
            user=record.get("UserId", "").split("(")[0],
            name=record.get("JobName", ""),
            slurm_state=slurm_state,
            exit_status=sp.exit_status(exit_code),
            message=sp.final_message(slurm_state, exit_code, format_duration(limit)),
            elapsed=sp.parse_slurm_time(record.get("RunTime", "")),
            time_limit=limit,
            assigned_gpus=[],
        )

    def _has_accounting(self) -> bool:
        if self._accounting is None:
            try:
                config = self._slurm(["scontrol", "show", "config"])
            except SchedulerError:
                return False
            self._accounting = (
                "accounting_storage/none" not in config and "AccountingStorageType" in config
            )
        return self._accounting


class _StderrRelay:
    """Passes srun's stderr (the job's stderr, and srun's own errors) on, keeping the last line."""

    def __init__(self, proc: subprocess.Popen[bytes], target: IO[bytes] | int | None) -> None:
        self.lines: list[str] = []
        self._writer = _Writer(target if target is not None else sys.stderr)
        self._thread = threading.Thread(
            target=self._run, args=(proc,), daemon=True, name="gpulane-srun"
        )
        self._thread.start()

    def _run(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        fd = proc.stderr.fileno()
        while chunk := os.read(fd, 65536):
            self._writer.emit(chunk)
            self.lines = (self.lines + chunk.decode(errors="replace").splitlines())[-5:]
        proc.stderr.close()

    def last_line(self) -> str:
        return self.lines[-1].removeprefix("srun: error: ").strip() if self.lines else ""

    def join(self) -> None:
        self._thread.join(5)


class _Writer:
    """Writes bytes to a file descriptor, a binary stream or a text stream (a notebook cell)."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def emit(self, data: bytes) -> None:
        if isinstance(self.target, int):
            os.write(self.target, data)
            return
        if hasattr(self.target, "encoding"):  # a text stream
            self.target.write(self._decoder.decode(data))
        else:
            self.target.write(data)
        self.target.flush()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)


def _wait(proc: subprocess.Popen[bytes]) -> int:
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _me() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def slurm_reachable(env: Mapping[str, str] | None = None) -> bool:
    """True where Slurm's commands exist and its controller answers."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return False
    try:
        done = subprocess.run(
            ["scontrol", "ping"],
            capture_output=True,
            text=True,
            timeout=10,
            env=dict(env or os.environ),
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and "UP" in done.stdout
