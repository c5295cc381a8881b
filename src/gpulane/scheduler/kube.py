"""The Kubernetes back end of ``%%gpu``: the broker's queue, and a worker pod the broker creates.

A kernel in a CPU-only user pod queues its cell at the broker (in the hub pod) exactly as
on one machine. On the grant it does not start anything itself: it asks the broker for
the cell's worker pod (``POST /v1/jobs/ID/worker``), giving only the address its kernel
listens on and the one-time key the worker must prove (read from the kernel's private
key file; it travels in the request body, then in a Secret, never in argv or environment).
The job's updates then carry the pod's phase (``pod``: "pulling image on node gpu-2");
the job ends when the pod ends (the broker follows it). Ctrl-C cancels the job: the
broker deletes the pod. ``GPULANE_BACKEND=kubernetes`` selects it (the admin sets it in
user pods, with ``GPULANE_BROKER_URL``: the broker's TCP API, the socket being in the hub
pod).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import IO

from gpulane.config import BROKER_URL_ENV
from gpulane.jobs import Request
from gpulane.scheduler.base import (
    JobUpdate,
    JobView,
    Launcher,
    Outcome,
    SchedulerError,
    UpdateCallback,
)
from gpulane.scheduler.embedded import CONNECT_WINDOW, BrokerScheduler, _Lease
from gpulane.scheduler.http import ServiceJSONClient
from gpulane.worker_env import RUNNER_ADDRESS_ENV, RUNNER_KEYFILE_ENV


class KubeCellScheduler(BrokerScheduler):
    """The broker's client, whose grants run in worker pods the broker creates: over its
    socket, or at ``GPULANE_BROKER_URL`` (a kernel in a user pod, with its hub token)."""

    local_launch = False

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        heartbeat: float = 2.0,
        token: str | None = None,
    ) -> None:
        super().__init__(socket, heartbeat, token)
        url = os.environ.get(BROKER_URL_ENV)
        if url:
            self.client = ServiceJSONClient(url, token or os.environ.get("JUPYTERHUB_API_TOKEN"))

    def run(
        self,
        request: Request,
        on_update: UpdateCallback | None = None,
        stdout: IO[bytes] | int | None = None,
        stderr: IO[bytes] | int | None = None,
        launcher: Launcher | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Outcome:
        env = dict(env or {})
        if RUNNER_ADDRESS_ENV not in env or RUNNER_KEYFILE_ENV not in env:
            raise SchedulerError(
                "on Kubernetes only a %%gpu cell runs in a worker pod (gpulane run needs a "
                "GPU server or a broker on this machine)"
            )
        with open(env[RUNNER_KEYFILE_ENV], "rb") as keyfile:
            key = keyfile.read()
        job = self.submit(request)
        lease = _PodLease(self, job, on_update, env[RUNNER_ADDRESS_ENV], key)
        return lease.run(request.command)

    def start_worker(self, job_id: int, connect: str, key: bytes) -> JobView:
        result: JobView = self.client.request(
            "POST",
            f"/v1/jobs/{job_id}/worker",
            {"connect": connect, "key": key.hex()},
            connect_wait=CONNECT_WINDOW,
        )
        return result


class _PodLease(_Lease):
    """The lease of a cell whose worker is a pod: asks for the pod on the grant, then
    follows the job to its end (the broker ends it with the pod)."""

    def __init__(
        self,
        scheduler: KubeCellScheduler,
        job: JobView,
        on_update: UpdateCallback | None,
        connect: str,
        key: bytes,
    ) -> None:
        super().__init__(scheduler, job, on_update, None, None)
        self.kube = scheduler
        self.connect = connect
        self.key = key
        self.asked = False

    def _main_loop(self, command: tuple[str, ...]) -> Outcome:
        while True:
            kind, item = self.inbox.get()
            if kind == "error":
                raise item
            update: JobUpdate = item
            self.job = update.job
            if self.on_update:
                self.on_update(update)
            if update.finished:
                status = update.job.get("exit_status")
                return Outcome(int(status) if status is not None else 1, update.job)
            if update.state == "running" and not self.asked and not update.job.get("ending"):
                self.asked = True
                try:
                    self.kube.start_worker(self.job_id, self.connect, self.key)
                except SchedulerError:
                    with contextlib.suppress(SchedulerError):
                        self.scheduler.cancel(self.job_id)
                    raise

    def _withdraw_or_stop(self) -> None:
        # Queued: withdrawn. Running: the broker deletes the worker pod (its keeper does).
        with contextlib.suppress(SchedulerError):
            self.scheduler.cancel(self.job_id)
