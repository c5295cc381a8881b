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
from dataclasses import dataclass, field, replace
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class

from gpulane.config import WARM_WORKER_ENV
from gpulane.display import status_table
from gpulane.jobs import OptionError, parse_count
from gpulane.kernel.activity import ActivityReporter, Hold, server_holds_gpu
from gpulane.kernel.card import Card, message_card, render_final
from gpulane.kernel.failures import GPUCellFailed, GPUJobFailed, WorkerExited, job_failure
from gpulane.kernel.names import names_used
from gpulane.kernel.options import (
    CellOptions,
    gpu_arguments,
    help_text,
    parse_cell_options,
    parse_session_options,
)
from gpulane.kernel.protocol import CellError, Done, RunCell
from gpulane.kernel.session import GpuSession
from gpulane.kernel.sinks import BackgroundSink, ForegroundSink
from gpulane.kernel.transfer import (
    Packed,
    TransferTooLarge,
    cleanup,
    default_spill_dir,
    pack,
    unpack,
)
from gpulane.kernel.worker import RUNNER_COMMAND, Launch, WarmPool, launch_for
from gpulane.scheduler import Scheduler, SchedulerError, connect
from gpulane.scheduler.base import JobUpdate, JobView, Outcome

USAGE = """%gpu status | %gpu cancel [JOB] | %gpu wait [JOB] | %gpu result [JOB]
%gpu session start [--idle 15m] [--gpus N | --slices K] [--time T] | %gpu session stop"""


class RemoteCellError(Exception):
    """An exception raised by the cell on the GPU worker; shown with the worker's traceback."""

    def __init__(self, error: CellError) -> None:
        super().__init__(error.evalue)
        self.ename, self.evalue = error.ename, error.evalue
        self.traceback = error.traceback_with_hint()


def remote_cell_error(error: CellError) -> RemoteCellError:
    """The cell's exception, of a class named as the user's own (``ValueError``), so the execute
    reply (which nbconvert and papermill read) names it, not this wrapper."""
    named: type[RemoteCellError] = type(
        error.ename, (RemoteCellError,), {"__module__": RemoteCellError.__module__}
    )
    return named(error)


@dataclass
class BackgroundJob:
    sink: BackgroundSink
    card: Card
    thread: threading.Thread
    job: JobView | None = None
    outcome: Outcome | None = None
    error: str | None = None
    # Why the job ended without the cell finishing, raised by %gpu wait and %gpu result.
    failure: GPUCellFailed | None = None
    values: dict[str, Any] | None = None
    applied: bool = False
    done: threading.Event = field(default_factory=threading.Event)


@magics_class
class GpuMagics(Magics):
    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.ip: Any = shell  # the InteractiveShell (Magics types it as optional)
        self.pool = WarmPool(enabled=os.environ.get(WARM_WORKER_ENV, "1") != "0")
        self.spill_dir = default_spill_dir()
        self.background: list[BackgroundJob] = []  # this notebook's --bg jobs, oldest first
        self.session: GpuSession | None = None
        self._scheduler: Scheduler | None = None
        # GPU work queued or running keeps the server busy to the hub's idle culler.
        self.activity = ActivityReporter.from_environment()
        self._cell_hold: Hold | None = None
        if self.activity.target is not None and server_holds_gpu(os.environ):
            # The whole server holds a GPU: any cell running is GPU work; an idle server
            # is still culled, and frees its GPU.
            shell.events.register("pre_run_cell", self._cell_starts)
            shell.events.register("post_run_cell", self._cell_ends)
        shell.set_custom_exc((RemoteCellError, GPUCellFailed), _show_remote_error)
        shell.events.register("pre_run_cell", self._apply_background_results)
        atexit.register(self.shutdown)
        self.pool.refill()

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            self._scheduler = connect()
        return self._scheduler

    # ------------------------------------------------------------------ %%gpu

    @gpu_arguments
    @line_cell_magic
    def gpu(self, line: str, cell: str | None = None) -> Any:
        """Run a cell on a GPU when it is your turn (``%%gpu [options]``).

        As a line magic it manages GPU jobs:
        ``%gpu status``, ``%gpu cancel [JOB]``, ``%gpu wait [JOB]``, ``%gpu result [JOB]``,
        ``%gpu session start [--idle T] [options]``, ``%gpu session stop``.
        """
        try:
            if cell is None:
                return self._line(line)
            options = parse_cell_options(line, default_name=f"cell-{self.ip.execution_count}")
        except OptionError as error:  # what was typed: IPython shows one line, state untouched
            raise UsageError(str(error)) from None
        try:
            inputs = self._inputs(cell, options)
        except TransferTooLarge as error:
            _print_notice(str(error))
            return None
        except OSError as error:  # the spill folder is full or gone
            _print_notice(
                f"cannot stage the cell's variables in {self.spill_dir}: {error.strerror}; nothing was submitted"
            )
            return None
        except SyntaxError as error:
            _print_notice(
                f"SyntaxError in the cell, line {error.lineno}: {error.msg}; nothing was submitted"
            )
            return None
        try:
            if options.session:
                return self._run_in_session(cell, options, inputs)
            if options.background:
                return self._run_background(cell, options, inputs)
            with self.activity.holding():
                return self._run_foreground(cell, options, inputs)
        except SchedulerError as error:
            cleanup(inputs)
            _print_notice(str(error))
            return None

    def _inputs(self, cell: str, options: CellOptions) -> Packed:
        namespace = self.ip.user_ns
        values = {name: namespace[name] for name in sorted(names_used(cell)) if name in namespace}
        packed = pack(values, self.spill_dir, options.max_transfer)
        for name, reason in packed.skipped.items():
            _print_notice(f"{name} is not sent to the GPU worker (it cannot be pickled: {reason})")
        return packed

    def _message(
        self, cell: str, options: CellOptions, inputs: Packed, once: bool = True
    ) -> RunCell:
        return RunCell(
            code=cell,
            inputs=inputs,
            returns=options.returns,
            execution_count=self.ip.execution_count,
            spill_dir=str(self.spill_dir),
            max_transfer=options.max_transfer,
            once=once,
        )

    def _launch(self, message: RunCell) -> Launch:
        return launch_for(message, self.scheduler.local_launch, self.pool)

    def _run_foreground(self, cell: str, options: CellOptions, inputs: Packed) -> None:
        request = replace(options.request, command=RUNNER_COMMAND)
        launch = self._launch(self._message(cell, options, inputs))
        worker = launch.worker
        sink = ForegroundSink()
        worker.attach(sink)
        card = Card(message_card(f"{request.name}: submitting", [request.describe()], "queued"))
        try:
            outcome = self.scheduler.run(
                request, on_update=card.on_update, launcher=launch.launcher, env=launch.env
            )
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

    def _finish(self, job: JobView, result: Done | None, sink: ForegroundSink, card: Card) -> None:
        """Show how the job ended and bring its names into the notebook; a job that ended without
        the cell finishing is an error to Jupyter, so Run All and papermill stop there."""
        note = ""
        if result and result.ok and result.outputs is not None:
            names = self._receive(result.outputs)
            note = f"returned: {', '.join(names)}" if names else ""
        if sink.error is not None:
            note = f"the cell raised {sink.error.ename}; the GPU was freed"
        card.show(render_final(job, note))
        if sink.error is not None:
            raise remote_cell_error(sink.error)
        failure = job_failure(job, finished=result is not None)
        if failure is not None:
            raise failure

    def _receive(self, outputs: Packed) -> list[str]:
        values, failures = unpack(outputs)
        for name, reason in failures.items():
            _print_notice(f"{name} did not come back from the GPU worker: {reason}")
        for name, reason in outputs.skipped.items():
            _print_notice(
                f"{name} did not come back from the GPU worker (it cannot be pickled: {reason})"
            )
        self.ip.user_ns.update(values)
        return sorted(values)

    # ------------------------------------------------------------------ --bg

    def _run_background(self, cell: str, options: CellOptions, inputs: Packed) -> None:
        request = replace(options.request, command=RUNNER_COMMAND)
        launch = self._launch(self._message(cell, options, inputs))
        worker = launch.worker
        card = Card(
            message_card(f"{request.name}: submitting (background)", [request.describe()], "queued")
        )
        sink = BackgroundSink()
        worker.attach(sink)
        holder: dict[str, BackgroundJob] = {}
        hold = self.activity.begin()  # until the job has ended, queued or run

        def on_update(update: JobUpdate) -> None:
            holder["job"].job = update.job
            card.on_update(update)

        def lifecycle() -> None:
            job = holder["job"]
            try:
                job.outcome = self.scheduler.run(
                    request, on_update=on_update, launcher=launch.launcher, env=launch.env
                )
                worker.wait_output()
                worker.close()
                result = worker.result
                if result and result.ok and result.outputs is not None:
                    job.values, failures = unpack(result.outputs)
                    for name, reason in failures.items():
                        sink.warnings.append(f"{name} did not come back: {reason}")
                final = job.outcome.job
                job.failure = job_failure(final, finished=result is not None)
                names = ", ".join(sorted(job.values or {})) or "none"
                if sink.error is not None:
                    note = f"{sink.error.ename}: {sink.error.evalue} (see %gpu wait)"
                elif job.failure is not None:
                    note = f"{type(job.failure).__name__}: {job.failure} (see %gpu wait)"
                else:
                    note = f"finished: names ({names}) are set before your next cell runs, or by %gpu wait"
                card.show(render_final(final, note))
            except SchedulerError as error:
                job.error = str(error)
                where = f"job {job.job['id']}: " if job.job else ""
                job.failure = GPUJobFailed(f"{where}{error}")
                card.show(message_card(f"{request.name}: failed", [str(error)], "failed"))
            finally:
                hold.end()
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
            _print_notice(f"background job {job_id}: {job.error}")

    # ------------------------------------------------------------------ sessions

    def _run_in_session(self, cell: str, options: CellOptions, inputs: Packed) -> None:
        session = self.session
        if session is None or not session.running:
            cleanup(inputs)
            _print_notice("no GPU session is running; start one with %gpu session start")
            return
        sink = ForegroundSink()
        result = session.run_cell(self._message(cell, options, inputs, once=False), sink)
        cleanup(inputs)
        if sink.error is not None:
            raise remote_cell_error(sink.error)
        if result and result.ok and result.outputs is not None:
            self._receive(result.outputs)
        elif result is None:
            raise WorkerExited(
                f"the GPU session ended during the cell: {session.ended_reason or 'worker exited'}"
            )

    # ------------------------------------------------------------------ %gpu

    def _line(self, line: str) -> Any:
        words = line.split()
        if not words or words[0] in ("-h", "--help", "help"):
            print(USAGE + "\n\n" + help_text())
            return None
        command, rest = words[0], words[1:]
        if command not in ("status", "cancel", "wait", "result", "session"):
            raise OptionError(
                f"%gpu {command}: unknown; use status, cancel, wait, result or session (see %gpu?)"
            )
        try:
            if command == "status":
                print(status_table(self.scheduler.snapshot()))
            elif command == "cancel":
                self._cancel(rest)
            elif command in ("wait", "result"):
                return self._wait(command, rest)
            else:
                self._session_command(rest)
        except SchedulerError as error:
            _print_notice(str(error))
        return None

    def _background_job(self, command: str, rest: list[str]) -> BackgroundJob | None:
        """The --bg job numbered in ``rest``, else this notebook's latest."""
        if not rest:
            return self.background[-1] if self.background else None
        wanted = _job_number(command, rest[0])
        return next((j for j in self.background if j.job and j.job["id"] == wanted), None)

    def _cancel(self, rest: list[str]) -> None:
        if rest:
            job_id: int | None = _job_number("cancel", rest[0])
        else:
            latest = self.background[-1] if self.background else None
            job_id = int(latest.job["id"]) if latest and latest.job else None
        if job_id is None:
            raise OptionError("%gpu cancel: which job? give its number (see %gpu status)")
        view = self.scheduler.cancel(job_id)
        print(f"job {job_id}: {'being stopped' if view['state'] == 'running' else view['state']}")

    def _wait(self, command: str, rest: list[str]) -> Any:
        job = self._background_job(command, rest)
        if job is None:
            _print_notice(f"%gpu {command}: no background job of this notebook with that number")
            return None
        try:
            while not job.done.wait(0.2):
                pass
        except KeyboardInterrupt:
            job_id = job.job["id"] if job.job else ""
            _print_notice(
                f"stopped waiting; job {job_id} goes on (cancel it with %gpu cancel {job_id})"
            )
            return None
        job.sink.replay()
        if not job.applied:
            self._apply(job)
        # A job that failed is an error to Jupyter here, as its cell would have been in the
        # foreground: Run All, nbconvert and papermill stop at the wait.
        if job.sink.error is not None:
            raise remote_cell_error(job.sink.error)
        if job.failure is not None:
            raise job.failure
        return dict(job.values or {}) if command == "result" else None

    def _session_command(self, rest: list[str]) -> None:
        action = rest[0] if rest else ""
        if action == "start":
            if self.session is not None and self.session.running:
                _print_notice(
                    f"a GPU session is already running (job {self.session.job_id}); %gpu session stop ends it"
                )
                return
            options = parse_session_options(" ".join(rest[1:]))
            empty = pack({}, self.spill_dir, options.cell.max_transfer)
            launch = self._launch(self._message("", options.cell, empty, once=False))
            self.session = GpuSession(
                self.scheduler, options, launch, self.pool.refill, activity=self.activity
            )
            self.session.start()
        elif action == "stop":
            if self.session is None or not self.session.running:
                _print_notice("no GPU session is running")
                return
            self.session.stop("stopped by %gpu session stop")
        else:
            raise OptionError(
                "%gpu session: start or stop? (%gpu session start [--idle 15m] [options])"
            )

    def _cell_starts(self, *args: Any) -> None:
        if self._cell_hold is not None:
            self._cell_hold.end()
        self._cell_hold = self.activity.begin()

    def _cell_ends(self, *args: Any) -> None:
        if self._cell_hold is not None:
            self._cell_hold.end()
            self._cell_hold = None

    def shutdown(self) -> None:
        if self.session is not None and self.session.running:
            self.session.stop("the kernel is shutting down")
        self.pool.shutdown()
        shutil.rmtree(self.spill_dir, ignore_errors=True)


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


def _show_remote_error(shell: Any, etype: Any, evalue: Any, tb: Any, tb_offset: Any = None) -> None:
    """Show the worker's traceback (pointing at the user's cell), under the user's exception name;
    a job that ended without the cell finishing, as one line."""
    if isinstance(evalue, GPUCellFailed):
        shell._showtraceback(etype, str(evalue), [f"{etype.__name__}: {evalue}"])
        return
    if not isinstance(evalue, RemoteCellError):
        shell.showtraceback((etype, evalue, tb), tb_offset=tb_offset)
        return
    remote_type = type(evalue.ename, (Exception,), {})
    shell._showtraceback(remote_type, evalue.evalue, evalue.traceback)


def _job_number(command: str, word: str) -> int:
    try:
        return parse_count(word, "JOB", maximum=2**62)
    except OptionError as error:
        raise OptionError(f"%gpu {command}: {error}") from None


def _print_notice(text: str) -> None:
    """One ``gpulane:`` line on stderr: something the user should know, not an error in what
    they typed (that is a UsageError)."""
    sys.stderr.write(f"gpulane: {text}\n")
    sys.stderr.flush()
