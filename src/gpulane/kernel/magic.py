"""``%%gpu`` and ``%gpu``: run a notebook cell on a GPU through the queue.

The magic talks only to the scheduler interface (``gpulane.scheduler``); the
worker it starts is the same on every back end.
"""

from __future__ import annotations

import atexit
import os
import shutil
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class

from gpulane.display import status_table
from gpulane.jobs import OptionError, parse_count
from gpulane.kernel.activity import ActivityReporter, Hold, server_holds_gpu
from gpulane.kernel.cell import CellContext, GpuCell, print_notice
from gpulane.kernel.failures import CellInterrupted, GPUCellFailed, RemoteCellError
from gpulane.kernel.names import names_used
from gpulane.kernel.options import (
    CellOptions,
    gpu_arguments,
    help_text,
    parse_cell_options,
    parse_session_options,
)
from gpulane.kernel.protocol import RunCell
from gpulane.kernel.returns import names_to_return
from gpulane.kernel.session import GpuSession, shortfall
from gpulane.kernel.spillpool import SpillPool
from gpulane.kernel.transfer import Packed, TransferTooLarge, cleanup, default_spill_dir, pack
from gpulane.kernel.worker import WarmPool, launch_for
from gpulane.scheduler import Scheduler, SchedulerError, connect

USAGE = """%gpu status | %gpu cancel [JOB] | %gpu wait [JOB] | %gpu result [JOB]
%gpu session start [--idle 15m] [--gpus N | --slices K | --gpu-mem M] [--time T] | %gpu session stop"""


@magics_class
class GpuMagics(Magics):
    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.ip: Any = shell  # the InteractiveShell (Magics types it as optional)
        self.pool = WarmPool.from_environment(os.environ)
        shell.events.register("post_run_cell", self.pool.refresh)  # the notebook's new imports
        self.spill_dir = default_spill_dir()
        self.spill_pool = SpillPool.from_environment(self.spill_dir, os.environ)
        self.background: list[GpuCell] = []  # this notebook's --bg jobs, oldest first
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
            options = parse_cell_options(line, default_name=f"cell-{self._cell_number()}")
        except OptionError as error:  # what was typed: IPython shows one line, state untouched
            raise UsageError(str(error)) from None
        session = self.session if self.session is not None and self.session.running else None
        if options.session and session is None:
            print_notice("no GPU session is running; start one with %gpu session start")
            return None
        try:
            inputs, returns = self._inputs(cell, options)
        except TransferTooLarge as error:
            print_notice(str(error))
            return None
        except OSError as error:  # the spill folder is full or gone
            print_notice(
                f"cannot stage the cell's variables in {self.spill_dir}: {error.strerror}; nothing was submitted"
            )
            return None
        except SyntaxError as error:
            print_notice(
                f"SyntaxError in the cell, line {error.lineno}: {error.msg}; nothing was submitted"
            )
            return None
        try:
            why_not = self._why_not_in_session(session, options)
            context = CellContext(
                self.scheduler,
                self.pool,
                self.ip.user_ns,
                self.activity,
                str(self.spill_dir),
                session,
            )
            gpu_cell = GpuCell(context, cell, options, inputs, returns, why_not)
            if session is not None and why_not is None:
                return gpu_cell.run_in(session)
            if options.background:
                self.background.append(gpu_cell)
                return gpu_cell.start_background()
            return gpu_cell.run()
        except SchedulerError as error:
            cleanup(inputs)
            print_notice(str(error))
            return None

    def _cell_number(self) -> int:
        """The number the notebook shows beside this cell (``In [2]``): the shell's count has
        already moved on to the next cell by the time the cell runs."""
        running = getattr(self.ip.displayhook, "exec_result", None)
        count = getattr(running, "execution_count", None)
        return count if isinstance(count, int) else int(self.ip.execution_count)

    @staticmethod
    def _why_not_in_session(session: GpuSession | None, options: CellOptions) -> str | None:
        """Why a cell queues on its own while the kernel's session is open; None: it runs in it."""
        if session is None or options.session:
            return None
        if options.no_session:
            return f"not in your GPU session (job {session.job_id}): --no-session"
        if options.background:
            return f"not in your GPU session (job {session.job_id}): a --bg cell queues on its own"
        short = shortfall(session.options.cell.request, options.request)
        return f"not in your GPU session (job {session.job_id}): {short}" if short else None

    def _inputs(self, cell: str, options: CellOptions) -> tuple[Packed, tuple[str, ...]]:
        """The cell's inputs, packed, and the names that will come back."""
        namespace = self.ip.user_ns
        values = {name: namespace[name] for name in sorted(names_used(cell)) if name in namespace}
        returns = names_to_return(cell, options.returns, options.no_return, values)
        packed = pack(values, self.spill_dir, options.max_transfer, pool=self.spill_pool)
        for name, reason in packed.skipped.items():
            print_notice(f"{name} is not sent to the GPU worker (it cannot be pickled: {reason})")
        return packed, returns

    def _apply_background_results(self, *args: Any) -> None:
        for job in self.background:
            if job.done.is_set():
                job.apply()

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
            print_notice(str(error))
        return None

    def _background_job(self, command: str, rest: list[str]) -> GpuCell | None:
        """The --bg job numbered in ``rest``, else this notebook's latest."""
        if not rest:
            return self.background[-1] if self.background else None
        wanted = _job_number(command, rest[0])
        return next((j for j in self.background if j.job_id == wanted), None)

    def _cancel(self, rest: list[str]) -> None:
        if rest:
            job_id: int | None = _job_number("cancel", rest[0])
        else:
            latest = self.background[-1] if self.background else None
            job_id = latest.job_id if latest else None
        if job_id is None:
            raise OptionError("%gpu cancel: which job? give its number (see %gpu status)")
        view = self.scheduler.cancel(job_id)
        print(f"job {job_id}: {'being stopped' if view['state'] == 'running' else view['state']}")

    def _wait(self, command: str, rest: list[str]) -> Any:
        job = self._background_job(command, rest)
        if job is None:
            print_notice(f"%gpu {command}: no background job of this notebook with that number")
            return None
        try:
            # A job that failed raises here, as its cell would have in the foreground: Run All,
            # nbconvert and papermill stop at the wait.
            end = job.wait()
        except KeyboardInterrupt:
            job_id = job.job_id or ""
            raise CellInterrupted(
                f"stopped waiting; job {job_id} goes on (cancel it with %gpu cancel {job_id})"
            ) from None
        # wait: the cell's last expression, as its Out would have been; result: its names.
        return dict(end.values) if command == "result" else end.value

    def _session_command(self, rest: list[str]) -> None:
        action = rest[0] if rest else ""
        if action == "start":
            if self.session is not None and self.session.running:
                print_notice(
                    f"a GPU session is already running (job {self.session.job_id}); %gpu session stop ends it"
                )
                return
            options = parse_session_options(" ".join(rest[1:]))
            empty = pack({}, self.spill_dir, options.cell.max_transfer)
            first = RunCell("", empty, (), 1, str(self.spill_dir), options.cell.max_transfer, False)
            launch = launch_for(first, self.scheduler.local_launch, self.pool)
            self.session = GpuSession(
                self.scheduler, options, launch, self.pool.refill, activity=self.activity
            )
            try:
                self.session.start()
            except KeyboardInterrupt:
                raise CellInterrupted(
                    "the GPU session was withdrawn; nothing holds a GPU"
                ) from None
        elif action == "stop":
            if self.session is None or not self.session.running:
                print_notice("no GPU session is running")
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
        self.spill_pool.close()
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
