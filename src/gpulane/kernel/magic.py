"""``%%gpu`` and ``%gpu``: run a notebook cell on a GPU through the queue.

The magic talks only to the scheduler interface (``gpulane.scheduler``); the
worker it starts is the same on every back end.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from IPython.core.magic import Magics, line_cell_magic, magics_class

from gpulane.display import status_table
from gpulane.jobs import OptionError, format_duration, parse_count, parse_duration
from gpulane.kernel.card import Card, message_card, render_final
from gpulane.kernel.namespace import (
    Packed,
    TransferTooLarge,
    cleanup,
    default_spill_dir,
    names_used,
    pack,
    unpack,
)
from gpulane.kernel.options import CellOptions, help_text, parse_cell_options
from gpulane.kernel.sinks import BackgroundSink, ForegroundSink
from gpulane.kernel.worker import RUNNER_COMMAND, RemoteWorker, WarmWorker, WorkerPool
from gpulane.scheduler import Scheduler, SchedulerError, connect
from gpulane.scheduler.base import JobUpdate, JobView, Outcome

USAGE = """%gpu status | %gpu cancel [JOB] | %gpu wait [JOB] | %gpu result [JOB]
%gpu session start [--idle 15m] [--gpus N | --slices K] [--time T] | %gpu session stop"""


class RemoteCellError(Exception):
    """An exception raised by the cell on the GPU worker; shown with the worker's traceback."""

    def __init__(self, ename: str, evalue: str, traceback: list[str]) -> None:
        super().__init__(evalue)
        self.ename, self.evalue, self.traceback = ename, evalue, traceback


@dataclass
class BackgroundJob:
    sink: BackgroundSink
    card: Card
    thread: threading.Thread
    job: JobView | None = None
    outcome: Outcome | None = None
    error: str | None = None
    values: dict[str, Any] | None = None
    applied: bool = False
    done: threading.Event = field(default_factory=threading.Event)


@magics_class
class GpuMagics(Magics):
    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.ip: Any = shell  # the InteractiveShell (Magics types it as optional)
        self.pool = WorkerPool(enabled=os.environ.get("GPULANE_WARM_WORKER", "1") != "0")
        self.spill_dir = default_spill_dir()
        self.background: list[BackgroundJob] = []  # this notebook's --bg jobs, oldest first
        self.session: GpuSession | None = None
        self._scheduler: Scheduler | None = None
        shell.set_custom_exc((RemoteCellError,), _show_remote_error)
        shell.events.register("pre_run_cell", self._apply_background_results)
        atexit.register(self.shutdown)
        self.pool.refill()

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            self._scheduler = connect()
        return self._scheduler

    # ------------------------------------------------------------------ %%gpu

    @line_cell_magic
    def gpu(self, line: str, cell: str | None = None) -> Any:
        """Run a cell on a GPU when it is your turn (``%%gpu``); manage GPU jobs (``%gpu``)."""
        if cell is None:
            return self._line(line)
        try:
            options = parse_cell_options(line, default_name=f"cell-{self.ip.execution_count}")
            inputs = self._inputs(cell, options)
        except (OptionError, TransferTooLarge) as error:
            _one_line(str(error))
            return None
        except OSError as error:  # the spill folder is full or gone
            _one_line(
                f"cannot stage the cell's variables in {self.spill_dir}: {error.strerror}; nothing was submitted"
            )
            return None
        except SyntaxError as error:
            _one_line(
                f"SyntaxError in the cell, line {error.lineno}: {error.msg}; nothing was submitted"
            )
            return None
        try:
            if options.session:
                return self._run_in_session(cell, options, inputs)
            if options.background:
                return self._run_background(cell, options, inputs)
            return self._run_foreground(cell, options, inputs)
        except SchedulerError as error:
            cleanup(inputs)
            _one_line(str(error))
            return None

    def _inputs(self, cell: str, options: CellOptions) -> Packed:
        namespace = self.ip.user_ns
        values = {name: namespace[name] for name in sorted(names_used(cell)) if name in namespace}
        packed = pack(values, self.spill_dir, options.max_transfer)
        for name, reason in packed.skipped.items():
            _one_line(f"{name} is not sent to the GPU worker (it cannot be pickled: {reason})")
        return packed

    def _message(
        self, cell: str, options: CellOptions, inputs: Packed, once: bool = True
    ) -> dict[str, Any]:
        return {
            "code": cell,
            "inputs": inputs,
            "returns": options.returns,
            "execution_count": self.ip.execution_count,
            "spill_dir": str(self.spill_dir),
            "max_transfer": options.max_transfer,
            "once": once,
        }

    def _worker(self, message: dict[str, Any]) -> tuple[WarmWorker, dict[str, Any]]:
        """A worker for one job, and the arguments that tell the scheduler how to start it.

        Where the back end starts jobs on this machine, a pre-started worker gets the
        grant at once; elsewhere a worker started by the cluster connects back.
        """
        if self.scheduler.local_launch:
            worker = self.pool.take()
            return worker, {"launcher": worker.launcher(message)}
        remote = RemoteWorker(message)
        return remote, {"env": remote.job_env}

    def _run_foreground(self, cell: str, options: CellOptions, inputs: Packed) -> None:
        request = replace(options.request, command=RUNNER_COMMAND)
        worker, how = self._worker(self._message(cell, options, inputs))
        sink = ForegroundSink()
        worker.attach(sink)
        card = Card(message_card(f"{request.name}: submitting", [request.describe()], "queued"))
        try:
            outcome = self.scheduler.run(request, on_update=card.on_update, **how)
        except KeyboardInterrupt:
            worker.wait_output(2)
            worker.close()
            card.show(
                message_card(
                    f"{request.name}: interrupted",
                    ["withdrawn or stopped; the GPU was freed"],
                    "cancelled",
                )
            )
            cleanup(inputs)
            raise
        except BaseException:
            with contextlib.suppress(Exception):
                worker.stop()
            cleanup(inputs)
            raise
        finally:
            self.pool.refill()
        worker.wait_output()
        worker.close()
        cleanup(inputs)
        self._finish(outcome.job, worker.result, sink, card)

    def _finish(
        self, job: JobView, result: dict[str, Any] | None, sink: ForegroundSink, card: Card
    ) -> None:
        """Show how the job ended and bring its names into the notebook."""
        state = job.get("state")
        note = ""
        if result and result.get("ok") and result.get("outputs") is not None:
            names = self._receive(result["outputs"])
            note = f"returned: {', '.join(names)}" if names else ""
        if sink.error is not None:
            note = f"the cell raised {sink.error['ename']}; the GPU was freed"
        card.show(render_final(job, note))
        if sink.error is not None:
            raise RemoteCellError(sink.error["ename"], sink.error["evalue"], _with_hint(sink.error))
        if state not in ("completed", "failed"):
            _one_line(f"job {job['id']} {state}: {job.get('message') or 'ended'}")

    def _receive(self, outputs: Packed) -> list[str]:
        values, failures = unpack(outputs)
        for name, reason in failures.items():
            _one_line(f"{name} did not come back from the GPU worker: {reason}")
        for name, reason in outputs.skipped.items():
            _one_line(
                f"{name} did not come back from the GPU worker (it cannot be pickled: {reason})"
            )
        self.ip.user_ns.update(values)
        return sorted(values)

    # ------------------------------------------------------------------ --bg

    def _run_background(self, cell: str, options: CellOptions, inputs: Packed) -> None:
        request = replace(options.request, command=RUNNER_COMMAND)
        worker, how = self._worker(self._message(cell, options, inputs))
        card = Card(
            message_card(f"{request.name}: submitting (background)", [request.describe()], "queued")
        )
        sink = BackgroundSink()
        worker.attach(sink)
        holder: dict[str, BackgroundJob] = {}

        def on_update(update: JobUpdate) -> None:
            holder["job"].job = update.job
            card.on_update(update)

        def lifecycle() -> None:
            job = holder["job"]
            try:
                job.outcome = self.scheduler.run(request, on_update=on_update, **how)
                worker.wait_output()
                worker.close()
                result = worker.result
                if result and result.get("ok") and result.get("outputs") is not None:
                    job.values, failures = unpack(result["outputs"])
                    for name, reason in failures.items():
                        sink.warnings.append(f"{name} did not come back: {reason}")
                final = job.outcome.job
                names = ", ".join(sorted(job.values or {})) or "none"
                note = (
                    f"finished: names ({names}) are set before your next cell runs, or by %gpu wait"
                    if sink.error is None
                    else f"{sink.error['ename']}: {sink.error['evalue']} (see %gpu wait)"
                )
                card.show(render_final(final, note))
            except SchedulerError as error:
                job.error = str(error)
                card.show(message_card(f"{request.name}: failed", [str(error)], "failed"))
            finally:
                cleanup(inputs)
                job.done.set()

        thread = threading.Thread(target=lifecycle, daemon=True, name="gpulane-bg")
        holder["job"] = BackgroundJob(sink=sink, card=card, thread=thread)
        self.background.append(holder["job"])
        thread.start()
        self.pool.refill()

    def _apply_background_results(self, *args: Any) -> None:
        for job in self.background:
            if job.done.is_set() and not job.applied:
                self._apply(job)

    def _apply(self, job: BackgroundJob) -> None:
        job.applied = True
        job_id = job.job["id"] if job.job else "?"
        if job.values:
            self.ip.user_ns.update(job.values)
            print(f"gpulane: background job {job_id} finished; set {', '.join(sorted(job.values))}")
        if job.error:
            _one_line(f"background job {job_id}: {job.error}")

    # ------------------------------------------------------------------ sessions

    def _run_in_session(self, cell: str, options: CellOptions, inputs: Packed) -> None:
        session = self.session
        if session is None or not session.running:
            cleanup(inputs)
            _one_line("no GPU session is running; start one with %gpu session start")
            return
        sink = ForegroundSink()
        result = session.run_cell(self._message(cell, options, inputs, once=False), sink)
        cleanup(inputs)
        if sink.error is not None:
            raise RemoteCellError(sink.error["ename"], sink.error["evalue"], _with_hint(sink.error))
        if result and result.get("ok") and result.get("outputs") is not None:
            self._receive(result["outputs"])
        elif result is None:
            _one_line(
                f"the GPU session ended during the cell: {session.ended_reason or 'worker exited'}"
            )

    # ------------------------------------------------------------------ %gpu

    def _line(self, line: str) -> Any:
        words = line.split()
        if not words or words[0] in ("-h", "--help", "help"):
            print(USAGE + "\n\n" + help_text())
            return None
        command, rest = words[0], words[1:]
        try:
            if command == "status":
                print(status_table(self.scheduler.snapshot()))
            elif command == "cancel":
                self._cancel(rest)
            elif command in ("wait", "result"):
                return self._wait(rest, result=command == "result")
            elif command == "session":
                self._session_command(rest)
            else:
                _one_line(f"%gpu {command}: unknown; use {USAGE}")
        except (OptionError, SchedulerError) as error:
            _one_line(str(error))
        return None

    def _background_job(self, rest: list[str]) -> BackgroundJob | None:
        """The --bg job numbered in ``rest``, else this notebook's latest."""
        if not rest:
            return self.background[-1] if self.background else None
        wanted = parse_count(rest[0], "JOB", maximum=2**62)
        return next((j for j in self.background if j.job and j.job["id"] == wanted), None)

    def _cancel(self, rest: list[str]) -> None:
        if rest:
            job_id: int | None = parse_count(rest[0], "JOB", maximum=2**62)
        else:
            latest = self.background[-1] if self.background else None
            job_id = int(latest.job["id"]) if latest and latest.job else None
        if job_id is None:
            _one_line("%gpu cancel: which job? give its number (see %gpu status)")
            return
        view = self.scheduler.cancel(job_id)
        print(f"job {job_id}: {'being stopped' if view['state'] == 'running' else view['state']}")

    def _wait(self, rest: list[str], result: bool) -> Any:
        job = self._background_job(rest)
        if job is None:
            _one_line("%gpu wait: no background job of this notebook with that number")
            return None
        try:
            while not job.done.wait(0.2):
                pass
        except KeyboardInterrupt:
            job_id = job.job["id"] if job.job else ""
            _one_line(
                f"stopped waiting; job {job_id} goes on (cancel it with %gpu cancel {job_id})"
            )
            return None
        job.sink.replay()
        if not job.applied:
            self._apply(job)
        if job.sink.error is not None:
            raise RemoteCellError(
                job.sink.error["ename"], job.sink.error["evalue"], _with_hint(job.sink.error)
            )
        return dict(job.values or {}) if result else None

    def _session_command(self, rest: list[str]) -> None:
        action = rest[0] if rest else ""
        if action == "start":
            if self.session is not None and self.session.running:
                _one_line(
                    f"a GPU session is already running (job {self.session.job_id}); %gpu session stop ends it"
                )
                return
            args = rest[1:]
            idle = 15 * 60.0
            if "--idle" in args:
                i = args.index("--idle")
                if i + 1 >= len(args):
                    raise OptionError("--idle needs a time, such as 15m")
                idle = float(parse_duration(args[i + 1], "--idle"))
                del args[i : i + 2]
            options = parse_cell_options(" ".join(args), default_name="gpu-session")
            self.session = GpuSession(self, options, idle)
            self.session.start()
        elif action == "stop":
            if self.session is None or not self.session.running:
                _one_line("no GPU session is running")
                return
            self.session.stop("stopped by %gpu session stop")
        else:
            _one_line("%gpu session start [--idle 15m] [options] | %gpu session stop")

    def shutdown(self) -> None:
        if self.session is not None and self.session.running:
            self.session.stop("the kernel is shutting down")
        self.pool.shutdown()
        shutil.rmtree(self.spill_dir, ignore_errors=True)


class GpuSession:
    """A worker kept alive under one lease: state (a model on the GPU) persists between cells."""

    def __init__(self, magics: GpuMagics, options: CellOptions, idle: float) -> None:
        self.magics = magics
        self.options = options
        self.idle = idle
        self.worker: WarmWorker | None = None
        self.job_id: int | None = None
        self.granted = threading.Event()
        self.ended = threading.Event()
        self.ended_reason = ""
        self.last_used = time.monotonic()
        self.card: Card | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self.granted.is_set() and not self.ended.is_set()

    def start(self) -> None:
        request = replace(self.options.request, command=RUNNER_COMMAND)
        empty = pack({}, self.magics.spill_dir, self.options.max_transfer)
        first = self.magics._message("", self.options, empty, once=False)
        worker, how = self.magics._worker(first)
        self.worker = worker
        worker.attach(ForegroundSink())
        self.card = card = Card(
            message_card("GPU session: submitting", [request.describe()], "queued")
        )

        def on_update(update: JobUpdate) -> None:
            self.job_id = int(update.job["id"])
            if update.state == "running" and not update.job.get("ending"):
                self.granted.set()
                self._show_running(update.job)
            else:
                card.on_update(update)

        def lifecycle() -> None:
            try:
                outcome = self.magics.scheduler.run(request, on_update=on_update, **how)
                self.ended_reason = self.ended_reason or outcome.job.get("message") or "ended"
                card.show(render_final(outcome.job, f"GPU session released: {self.ended_reason}"))
            except SchedulerError as error:
                self.ended_reason = str(error)
                card.show(message_card("GPU session failed", [str(error)], "failed"))
            finally:
                self.ended.set()
                self.granted.set()

        threading.Thread(target=lifecycle, daemon=True, name="gpulane-session").start()
        self.magics.pool.refill()
        try:
            while not self.granted.wait(0.1):
                pass
        except KeyboardInterrupt:
            self.stop("interrupted while waiting")
            raise
        worker.done.wait(30)  # the empty first cell: grant environment and memory caps applied
        threading.Thread(target=self._watch_idle, daemon=True, name="gpulane-idle").start()

    def _show_running(self, job: JobView) -> None:
        assert self.card is not None
        gpus = ",".join(map(str, job.get("assigned_gpus") or []))
        self.card.show(
            message_card(
                f"GPU session (job {job['id']}) holds GPU {gpus}",
                [f"released after {format_duration(self.idle)} idle, or by %gpu session stop; "
                 f"time limit {format_duration(job.get('time_limit'))}"],
                "running",
            )
        )  # fmt: skip

    def run_cell(self, message: dict[str, Any], sink: ForegroundSink) -> dict[str, Any] | None:
        worker = self.worker
        assert worker is not None
        with self._lock:
            self.last_used = time.monotonic()
            worker.sink = sink
            worker.run({}, message)
            try:
                while not worker.done.wait(0.1):
                    pass
            except KeyboardInterrupt:
                worker.interrupt()  # user code gets KeyboardInterrupt; the session lives on
                if not worker.done.wait(5):
                    self.stop("the cell did not stop after an interrupt")
                raise
            finally:
                self.last_used = time.monotonic()
            return worker.result

    def _watch_idle(self) -> None:
        while not self.ended.wait(1.0):
            if not self._lock.locked() and time.monotonic() - self.last_used > self.idle:
                self.stop(f"idle for {format_duration(self.idle)}")
                return

    def stop(self, reason: str) -> None:
        self.ended_reason = reason
        if self.worker is not None:
            self.worker.stop()
        elif self.job_id is not None:
            with contextlib.suppress(SchedulerError):
                self.magics.scheduler.cancel(self.job_id)
        self.ended.wait(10)


def hoist_gpu_magic(lines: list[str]) -> list[str]:
    """Let comments stand above ``%%gpu``: IPython only sees a cell magic on the first line."""
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if index and stripped.startswith("%%gpu"):
            return [lines[index], *lines[:index], *lines[index + 1 :]]
        return lines
    return lines


def _with_hint(error: dict[str, Any]) -> list[str]:
    traceback = list(error.get("traceback") or [])
    if error.get("hint"):
        traceback.append(f"gpulane: {error['hint']}")
    return traceback


def _show_remote_error(shell: Any, etype: Any, evalue: Any, tb: Any, tb_offset: Any = None) -> None:
    """Show the worker's traceback (pointing at the user's cell), under the user's exception name."""
    if not isinstance(evalue, RemoteCellError):
        shell.showtraceback((etype, evalue, tb), tb_offset=tb_offset)
        return
    remote_type = type(evalue.ename, (Exception,), {})
    shell._showtraceback(remote_type, evalue.evalue, evalue.traceback)


def _one_line(text: str) -> None:
    sys.stderr.write(f"gpulane: {text}\n")
    sys.stderr.flush()
