"""One ``%%gpu`` cell's life, the same in the foreground, in the background (``--bg``) and in
a GPU session, so that the three cannot drift apart.

A :class:`GpuCell` owns the cell's inputs (their spill files), its worker, its card and its
sink, and its end (:class:`CellEnd`): the names it brings back are set in the notebook, the
names that did not come back are said, the last expression's value is returned as the cell's
``Out``, and a failure is raised so that Run All stops.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

from gpulane.kernel.activity import ActivityReporter
from gpulane.kernel.card import Card, CardView, message_card, render_final
from gpulane.kernel.failures import (
    CellInterrupted,
    GPUCellFailed,
    GPUJobFailed,
    WorkerExited,
    job_failure,
    remote_cell_error,
)
from gpulane.kernel.options import CellOptions
from gpulane.kernel.protocol import CellError, Done, RunCell
from gpulane.kernel.returns import RESULT
from gpulane.kernel.session import GpuSession
from gpulane.kernel.sinks import BackgroundSink, ForegroundSink
from gpulane.kernel.transfer import Packed, cleanup, transfer_lines, unpack
from gpulane.kernel.worker import (
    RUNNER_COMMAND,
    Launch,
    Sink,
    WarmPool,
    WorkerHandle,
    launch_for,
)
from gpulane.scheduler import Scheduler, SchedulerError
from gpulane.scheduler.base import JobUpdate, JobView, Outcome


@dataclass(frozen=True)
class CellContext:
    """What a cell needs from its kernel."""

    scheduler: Scheduler
    pool: WarmPool
    namespace: dict[str, Any]
    activity: ActivityReporter
    spill_dir: str
    session: GpuSession | None = None  # the kernel's open GPU session, if any


@dataclass
class CellEnd:
    """What a cell's end brings to the notebook."""

    values: dict[str, Any] = field(default_factory=dict)  # the names that came back
    value: Any = None  # the last expression's value: the cell's Out
    notices: list[str] = field(default_factory=list)  # names that did not come back, and why
    error: CellError | None = None  # the cell's own exception
    failure: GPUCellFailed | None = None  # the job ended without the cell finishing

    def note(self) -> str:
        """The card's last line."""
        if self.error is not None:
            return f"the cell raised {self.error.ename}; the GPU was freed"
        return f"returned: {', '.join(sorted(self.values))}" if self.values else ""

    def raise_failure(self) -> None:
        if self.error is not None:
            raise remote_cell_error(self.error)
        if self.failure is not None:
            raise self.failure


def read_end(result: Done | None, error: CellError | None, job: JobView | None) -> CellEnd:
    """The end of a cell from the worker's ``done``, the cell's exception and the job's view."""
    end = CellEnd(error=error)
    if result is not None and result.ok and result.outputs is not None:
        end.values, failures = unpack(result.outputs)
        end.value = end.values.pop(RESULT, None)
        for name, reason in failures.items():
            what = "the cell's result" if name == RESULT else name
            end.notices.append(f"{what} did not come back from the GPU worker: {reason}")
        for name, reason in result.outputs.skipped.items():
            end.notices.append(
                f"{name} did not come back from the GPU worker (it cannot be pickled: {reason})"
            )
    if job is not None and error is None:
        end.failure = job_failure(job, finished=result is not None)
    return end


class GpuCell:
    """One ``%%gpu`` cell from its submission to its end; see the module's docstring."""

    def __init__(
        self,
        context: CellContext,
        code: str,
        options: CellOptions,
        inputs: Packed,
        returns: tuple[str, ...],
        why_not_in_session: str | None = None,
    ) -> None:
        self.context = context
        self.code, self.options, self.inputs, self.returns = code, options, inputs, returns
        self.request = replace(options.request, command=RUNNER_COMMAND)
        self.name = self.request.name
        self.why_not_in_session = why_not_in_session  # a line for the card, when one is open
        self.job: JobView | None = None  # the latest view of its job
        self.end: CellEnd | None = None
        self.sink: Sink | None = None
        self.done = threading.Event()  # a --bg cell's end is known
        self.applied = False

    @property
    def job_id(self) -> int | None:
        return int(self.job["id"]) if self.job else None

    def message(self, once: bool = True) -> RunCell:
        return RunCell(
            code=self.code,
            inputs=self.inputs,
            returns=self.returns,
            execution_count=1,
            spill_dir=self.context.spill_dir,
            max_transfer=self.options.max_transfer,
            once=once,
        )

    # ------------------------------------------------------------------ the foreground

    def run(self) -> Any:
        """Queue, run, and end the cell while the user waits; returns its last expression."""
        sink = ForegroundSink()
        with self.context.activity.holding():  # queued or running: the server is busy
            card = self._card("submitting")
            launch = self._launch(sink)
            try:
                outcome = self._submit(launch, card)
            except KeyboardInterrupt:
                self._interrupted(launch.worker, card)
            except SchedulerError as error:
                # Refused (or no broker): the card itself becomes the refusal, one red card
                # with the reason and its fix, not an orange "submitting" above a red line.
                with contextlib.suppress(Exception):
                    launch.worker.stop()
                card.show(message_card(f"{self.name}: not submitted", [str(error)], "failed"))
                return None
            except BaseException:
                with contextlib.suppress(Exception):
                    launch.worker.stop()
                raise
            finally:
                cleanup(self.inputs)
                self.context.pool.refill()
            launch.worker.wait_output()
            launch.worker.close()
        end = read_end(launch.worker.result, sink.error, outcome.job)
        card.show(self._final_view(outcome.job, end.note(), launch.worker.result))
        return self._finish(end)

    def _interrupted(self, worker: WorkerHandle, card: Card) -> NoReturn:
        """The scheduler has withdrawn or stopped the job (it is recorded as cancelled by the
        user): say so on the card at once, then in one line."""
        ran = self.job is not None and self.job.get("state") == "running"
        where = f"job {self.job_id}" if self.job else self.name
        if ran:
            lines, said = ["cancelled by you (interrupt); the GPU was freed"], "cancelled"
        else:
            lines, said = ["withdrawn from the queue (interrupt); nothing ran"], "withdrawn"
        card.show(CardView(f"{where} ({self.name})", lines, "cancelled"))
        if ran:
            worker.wait_output(2)  # it has exited: the last of its output
            worker.close()
        else:  # a warm worker that never got the cell: nothing to wait for
            threading.Thread(target=worker.stop, daemon=True, name="gpulane-stop").start()
        tail = "the GPU was freed" if ran else "nothing ran"
        raise CellInterrupted(f"{where} {said}; {tail}") from None

    # ------------------------------------------------------------------ --bg

    def start_background(self) -> None:
        """Queue the cell and return at once; its end is applied before a later cell runs
        (:meth:`apply`), or by ``%gpu wait``."""
        sink = BackgroundSink()
        card = self._card("submitting (background)")
        launch = self._launch(sink)  # on the main thread: the worker dies with the kernel
        hold = self.context.activity.begin()  # until the job has ended, queued or run
        thread = threading.Thread(
            target=self._background, args=(launch, card, sink, hold.end), daemon=True
        )
        thread.name = "gpulane-bg"
        thread.start()
        self.context.pool.refill()

    def _background(
        self, launch: Launch, card: Card, sink: BackgroundSink, release: Callable[[], None]
    ) -> None:
        try:
            outcome = self._submit(launch, card)
            launch.worker.wait_output()
            launch.worker.close()
            self.end = end = read_end(launch.worker.result, sink.error, outcome.job)
            card.show(self._final_view(outcome.job, _background_note(end), launch.worker.result))
        except SchedulerError as error:
            where = f"job {self.job_id}: " if self.job else ""
            self.end = CellEnd(notices=[str(error)], failure=GPUJobFailed(f"{where}{error}"))
            card.show(message_card(f"{self.name}: failed", [str(error)], "failed"))
        finally:
            release()
            cleanup(self.inputs)
            self.done.set()

    def apply(self) -> None:
        """Set a finished --bg cell's names in the notebook and say what did not come back,
        once."""
        if self.applied or self.end is None:
            return
        self.applied = True
        job = self.job_id if self.job_id is not None else "?"
        if self.end.values:
            names = ", ".join(sorted(self.end.values))
            self.context.namespace.update(self.end.values)
            print(f"gpulane: background job {job} finished; set {names}")
        for notice in self.end.notices:
            print_notice(f"background job {job}: {notice}")

    def wait(self) -> CellEnd:
        """Until a --bg cell has ended: its kept displays shown, its names set; its failure
        raised (as its cell would have in the foreground, so Run All stops here)."""
        while not self.done.wait(0.2):
            pass
        if isinstance(self.sink, BackgroundSink):
            self.sink.replay()
        self.apply()
        end = self.end or CellEnd(failure=GPUJobFailed(f"{self.name}: ended without a result"))
        end.raise_failure()
        return end

    # ------------------------------------------------------------------ in a session

    def run_in(self, session: GpuSession) -> Any:
        """Run the cell in the kernel's GPU session; no queue, the session holds the GPU."""
        sink = ForegroundSink()
        where = f"your GPU session (job {session.job_id})"
        card = Card(message_card(f"{self.name} runs in {where}", [_held(session)], "running"))
        try:
            result = session.run_cell(self.message(once=False), sink)
        except KeyboardInterrupt:
            card.show(message_card(f"{self.name}: interrupted", [f"{where} goes on"], "cancelled"))
            raise CellInterrupted(f"{self.name} interrupted; {where} goes on") from None
        finally:
            cleanup(self.inputs)
        end = read_end(result, sink.error, None)
        if result is None and end.error is None:
            reason = session.ended_reason or "worker exited"
            end.failure = WorkerExited(f"the GPU session ended during the cell: {reason}")
        state = "failed" if end.error or end.failure else "completed"
        lines = [line for line in (end.note(),) if line] or ["done"]
        lines += transfer_lines(self.inputs, result.outputs if result else None)
        card.show(message_card(f"{self.name} ran in {where}", lines, state))
        return self._finish(end)

    # ------------------------------------------------------------------ shared

    def _final_view(self, job: JobView, note: str, result: Done | None) -> CardView:
        """How the job ended, with a line for each transfer that took over a second."""
        view = render_final(job, note)
        view.lines += transfer_lines(self.inputs, result.outputs if result else None)
        return view

    def _card(self, doing: str) -> Card:
        lines = [self.request.describe()]
        if self.why_not_in_session:
            lines.append(self.why_not_in_session)
        return Card(message_card(f"{self.name}: {doing}", lines, "queued"), notes=self._notes)

    def _launch(self, sink: Sink) -> Launch:
        launch = launch_for(self.message(), self.context.scheduler.local_launch, self.context.pool)
        self.sink = sink
        launch.worker.attach(sink)
        return launch

    def _submit(self, launch: Launch, card: Card) -> Outcome:
        """Queue the job and run the cell on its grant; returns when the job has ended."""

        def on_update(update: JobUpdate) -> None:
            self.job = update.job
            card.on_update(update)

        return self.context.scheduler.run(
            self.request, on_update=on_update, launcher=launch.launcher, env=launch.env
        )

    def _notes(self, update: JobUpdate) -> list[str]:
        """The kernel's own lines on a queued card: why it is not in the session, and a wait
        behind the user's own job, with what to do."""
        notes = [self.why_not_in_session] if self.why_not_in_session else []
        session = self.context.session
        for holder in update.holders or []:
            if session is not None and session.running and holder["job"] == session.job_id:
                notes.append(
                    f"it waits for your own GPU session (job {holder['job']}): "
                    "%gpu session stop frees its GPU, or run the cell without --no-session"
                )
            elif holder.get("user") and holder.get("user") == update.job.get("user"):
                notes.append(
                    f"it waits for your own job {holder['job']} ({holder.get('name', '')}): "
                    f"%gpu cancel {holder['job']} frees its GPU"
                )
        return notes

    def _finish(self, end: CellEnd) -> Any:
        self.end = end
        self.context.namespace.update(end.values)
        for notice in end.notices:
            print_notice(notice)
        end.raise_failure()
        return None if _quiet(self.code) else end.value


def _background_note(end: CellEnd) -> str:
    if end.error is not None:
        return f"{end.error.ename}: {end.error.evalue} (see %gpu wait)"
    if end.failure is not None:
        return f"{type(end.failure).__name__}: {end.failure} (see %gpu wait)"
    names = ", ".join(sorted(end.values)) or "none"
    return f"finished: names ({names}) are set before your next cell runs, or by %gpu wait"


def _held(session: GpuSession) -> str:
    return f"it holds {session.options.cell.request.describe()}; no queue"


def _quiet(code: str) -> bool:
    """A cell ending in ``;`` shows no result, as in IPython."""
    from IPython.core.displayhook import DisplayHook

    return bool(DisplayHook.semicolon_at_end_of_expression(code))  # type: ignore[no-untyped-call]


def print_notice(text: str) -> None:
    """One ``gpulane:`` line on stderr: something the user should know, not an error in what
    they typed (that is a UsageError)."""
    sys.stderr.write(f"gpulane: {text}\n")
    sys.stderr.flush()
