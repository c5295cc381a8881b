"""Why a ``%%gpu`` cell failed without an exception of its own: raised from the magic so that
Jupyter sees an error (Run All, nbconvert and papermill stop), under a name that says what
happened, with a one-line traceback instead of the magic's insides."""

from __future__ import annotations

from gpulane.kernel.protocol import CellError
from gpulane.scheduler.base import JobView


class GPUCellFailed(Exception):
    """The cell's GPU job ended without the cell finishing."""


class GPUTimeLimit(GPUCellFailed):
    """The job's GPU time limit ended it."""


class GPUJobCancelled(GPUCellFailed):
    """Someone (the user, an admin) cancelled the job."""


class GPUJobFailed(GPUCellFailed):
    """The broker ended the job (its lease was lost, it could not start, ...)."""


class WorkerKilled(GPUCellFailed):
    """A signal killed the GPU worker (SIGKILL, the OOM killer, SIGSEGV)."""


class WorkerExited(GPUCellFailed):
    """The GPU worker exited before the cell finished (``os._exit``, a crash in C code)."""


def job_failure(job: JobView, finished: bool) -> GPUCellFailed | None:
    """The error for a job that ended without the cell finishing; None if the cell finished.

    ``finished`` is whether the worker reported the cell's end."""
    state = job.get("state")
    message = job.get("message") or state
    where = f"job {job['id']}: "
    if state == "timeout":
        return GPUTimeLimit(where + str(message))
    if state == "cancelled":
        return GPUJobCancelled(where + str(message))
    if state == "failed":
        status = job.get("exit_status")
        if isinstance(status, int) and status < 0:
            return WorkerKilled(f"{where}the GPU worker was {message}; the GPU was freed")
        if isinstance(status, int):
            return WorkerExited(f"{where}the GPU worker {message}; the GPU was freed")
        return GPUJobFailed(where + str(message))
    if not finished:
        return WorkerExited(f"{where}the GPU worker exited before the cell finished")
    return None


class CellInterrupted(KeyboardInterrupt):
    """The user interrupted the cell; said in one line, in their terms, with no traceback
    through gpulane (IPython shows ``_render_traceback_`` instead of the frames)."""

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


# Jupyter, nbconvert and papermill read the class name: it stays the user's KeyboardInterrupt.
CellInterrupted.__name__ = CellInterrupted.__qualname__ = "KeyboardInterrupt"


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
