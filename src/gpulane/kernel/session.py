"""``%gpu session``: one GPU worker kept alive under one lease, so state stays on the GPU."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace

from gpulane.jobs import Request, format_bytes, format_duration
from gpulane.kernel.activity import ActivityReporter
from gpulane.kernel.card import Card, message_card, render_final
from gpulane.kernel.options import SessionOptions
from gpulane.kernel.protocol import Done, RunCell
from gpulane.kernel.sinks import ForegroundSink
from gpulane.kernel.worker import RUNNER_COMMAND, Launch
from gpulane.scheduler import Scheduler, SchedulerError
from gpulane.scheduler.base import JobUpdate, JobView


class GpuSession:
    """A worker kept alive under one lease: state (a model on the GPU) persists between cells.

    It ends when idle for ``options.idle`` seconds, by :meth:`stop`, at the job's time
    limit, or with the kernel.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        options: SessionOptions,
        launch: Launch,
        on_submitted: Callable[[], None],
        activity: ActivityReporter | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.options = options
        self.idle = options.idle
        self.launch = launch
        self.worker = launch.worker
        self._on_submitted = on_submitted  # the kernel warms its next worker meanwhile
        self.job_id: int | None = None
        self.granted = threading.Event()
        self.ended = threading.Event()
        self.ended_reason = ""
        self.last_used = time.monotonic()
        self.card: Card | None = None
        self._lock = threading.Lock()
        # Queued or holding the GPU, the session keeps the server busy to the hub's idle
        # culler; an idle session is released by its own --idle, and then the server idles.
        self._activity = activity or ActivityReporter(None)

    @property
    def running(self) -> bool:
        return self.granted.is_set() and not self.ended.is_set()

    def start(self) -> None:
        """Queue the session's job and wait until it holds the GPU and its worker is set up."""
        request = replace(self.options.cell.request, command=RUNNER_COMMAND)
        worker = self.worker
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

        hold = self._activity.begin()

        def lifecycle() -> None:
            try:
                outcome = self.scheduler.run(
                    request,
                    on_update=on_update,
                    launcher=self.launch.launcher,
                    env=self.launch.env,
                )
                self.ended_reason = self.ended_reason or outcome.job.get("message") or "ended"
                card.show(render_final(outcome.job, f"GPU session released: {self.ended_reason}"))
            except SchedulerError as error:
                self.ended_reason = str(error)
                card.show(message_card("GPU session failed", [str(error)], "failed"))
            finally:
                hold.end()
                self.ended.set()
                self.granted.set()

        threading.Thread(target=lifecycle, daemon=True, name="gpulane-session").start()
        self._on_submitted()
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

    def run_cell(self, message: RunCell, sink: ForegroundSink) -> Done | None:
        """Run one cell in the session's worker; None when the worker ended during it."""
        worker = self.worker
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
        self.worker.stop()
        self.ended.wait(10)


def shortfall(held: Request, asked: Request) -> str | None:
    """What a cell asks beyond what a session holds, in words; None if it fits.

    Only what the cell asks beyond the defaults counts: a plain ``%%gpu`` cell fits any
    session, slices fit in a session of whole GPUs, and the session's time limit is the cell's.
    """
    if asked.gpus > 1 and (held.slices or asked.gpus > held.gpus):
        return f"it asks {asked.describe()}, the session holds {held.describe()}"
    if asked.slices and held.slices and asked.slices > held.slices:
        return f"it asks {asked.describe()}, the session holds {held.describe()}"
    if asked.mem and held.mem and asked.mem > held.mem:
        return (
            f"it asks {format_bytes(asked.mem)} of memory, the session has {format_bytes(held.mem)}"
        )
    return None
