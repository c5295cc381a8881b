"""Why a ``%%gpu`` cell failed without an exception of its own: raised from the magic so that
Jupyter sees an error (Run All, nbconvert and papermill stop), under a name that says what
happened, with a one-line traceback instead of the magic's insides."""

from __future__ import annotations

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
