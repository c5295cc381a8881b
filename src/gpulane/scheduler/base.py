"""The one interface every back end implements. The CLI, the magic and the hub use only this.

Views are JSON-shaped dicts of the shapes in :mod:`gpulane.views`, the same on
every back end, so that a job printed by ``gpulane status`` and one shown in a
notebook card read alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Protocol

from gpulane import views
from gpulane.errors import SchedulerError, SchedulerUnavailable
from gpulane.jobs import Request, is_finished

# Re-exported: the back ends and readers take them from here.
__all__ = ["Holder", "JobView", "SchedulerError", "SchedulerUnavailable", "Snapshot"]

JobView = views.JobView
Holder = views.Holder
Snapshot = views.Snapshot


@dataclass(frozen=True)
class JobUpdate:
    """One change of a job, with who holds the GPUs at that moment."""

    job: JobView
    holders: list[Holder]
    now: float

    @property
    def state(self) -> str:
        return self.job["state"]

    @property
    def finished(self) -> bool:
        return is_finished(self.state)


@dataclass(frozen=True)
class Outcome:
    """How a run ended: the command's exit status and the job's final view."""

    exit_status: int
    job: JobView


UpdateCallback = Callable[[JobUpdate], None]


class CommandProcess(Protocol):
    """A job's command as the back end watches it: a ``Popen``, or a worker forked by the
    kernel's fork server (which the kernel cannot ``waitpid``). It leads its process group."""

    @property
    def pid(self) -> int: ...
    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...


# Starts the job's process once GPUs are granted, given the grant's environment
# (CUDA_VISIBLE_DEVICES, GPULANE_JOB_ID, ...). Back ends that start processes on
# this machine use it (the magic hands the grant to a pre-started worker); back
# ends that start them elsewhere run ``request.command`` themselves.
Launcher = Callable[[dict[str, str]], CommandProcess]


class Scheduler(ABC):
    """Submit, watch, cancel, snapshot, and run a command on granted GPUs."""

    backend: str = "?"
    reason: str = ""  # why this back end was chosen, for `gpulane status`
    # True where run() starts the command on this machine through a Launcher (the
    # magic then hands the grant to a pre-started worker); False where the back end
    # starts it elsewhere and the worker connects back.
    local_launch: bool = True

    @abstractmethod
    def submit(self, request: Request) -> JobView: ...

    @abstractmethod
    def updates(self, job_id: int) -> Iterator[JobUpdate]:
        """Every change of the job until it finishes; survives a restart of the back end."""

    @abstractmethod
    def cancel(self, job_id: int) -> JobView: ...

    @abstractmethod
    def job(self, job_id: int) -> JobView: ...

    @abstractmethod
    def snapshot(self) -> Snapshot:
        """GPUs, holders and the queue in order, as ``gpulane status --json`` prints it."""

    @abstractmethod
    def run(
        self,
        request: Request,
        on_update: UpdateCallback | None = None,
        stdout: IO[bytes] | int | None = None,
        stderr: IO[bytes] | int | None = None,
        launcher: Launcher | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Outcome:
        """Queue ``request``, run its command on the granted GPUs, free them when it ends.

        ``env`` adds variables to the command's environment (never secrets: on some
        back ends they are visible to the scheduler).

        ``KeyboardInterrupt`` while queued withdraws the job; while running it stops
        the command (SIGINT, then SIGTERM, then SIGKILL) and frees the GPUs, then
        propagates.
        """
