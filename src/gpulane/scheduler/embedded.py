"""The embedded broker's client: the Scheduler interface over its Unix socket.

On this back end the client runs the command itself, as the user, once the
broker grants GPUs; it holds the lease with heartbeats and reports the end.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from typing import IO, Any

from gpulane import config
from gpulane.config import GPU_MEMORY_FRACTION_ENV, GPU_MEMORY_LIMIT_ENV, JOB_ID_ENV, SLICES_ENV
from gpulane.jobs import Request
from gpulane.scheduler.base import (
    CommandProcess,
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
from gpulane.scheduler.http import ServiceJSONClient, UnixJSONClient
from gpulane.scheduler.spawn import spawn_command

RECONNECT_WINDOW = 60.0  # how long a client keeps trying while the broker restarts
# How long a new submit or cancel dials a broker that is not answering (a restart takes ~1 s).
CONNECT_WINDOW = 30.0
STOP_GRACE = 5.0  # SIGINT, then SIGTERM after half of this, then SIGKILL
STATUS_PAGE = 1000  # queue entries asked for per status request (the broker's maximum)
MAX_STATUS_PAGES = 100  # a status read stops after this many pages


def broker_url(socket: str | os.PathLike[str] | None = None) -> str | None:
    """``$GPULANE_BROKER_URL`` (the broker's API over TCP, from a pod without its socket),
    unless a socket is named, as an argument or by ``$GPULANE_SOCKET``, which wins."""
    if socket or os.environ.get(config.SOCKET_ENV):
        return None
    return os.environ.get(config.BROKER_URL_ENV) or None


class BrokerScheduler(Scheduler):
    backend = "broker"

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        heartbeat: float = 2.0,
        token: str | None = None,
    ) -> None:
        self.socket = config.socket_path(socket)
        # Inside a JupyterHub server its token names the hub user; the hub passes one explicitly.
        token = token or os.environ.get("JUPYTERHUB_API_TOKEN")
        url = broker_url(socket)
        # Over TCP the broker cannot see this client's processes: it never signals them.
        self.remote = url is not None
        self.client = (
            ServiceJSONClient(url, token) if url else UnixJSONClient(self.socket, token=token)
        )
        self.heartbeat_interval = heartbeat

    # ------------------------------------------------------------------ the interface

    def submit(self, request: Request) -> JobView:
        result: JobView = self.client.request(
            "POST", "/v1/jobs", request.to_json(), connect_wait=CONNECT_WINDOW
        )
        return result

    def cancel(self, job_id: int) -> JobView:
        result: JobView = self.client.request(
            "DELETE", f"/v1/jobs/{job_id}", connect_wait=CONNECT_WINDOW
        )
        return result

    def job(self, job_id: int) -> JobView:
        result: JobView = self.client.request("GET", f"/v1/jobs/{job_id}")
        return result

    def snapshot(self) -> Snapshot:
        """The whole state: the broker answers the queue in pages; this reads them all."""
        result: Snapshot = self.client.request("GET", f"/v1/status?limit={STATUS_PAGE}")
        queue = result["queue"]
        # Bounded: a queue that keeps growing while we read is cut at MAX_STATUS_PAGES.
        for _ in range(MAX_STATUS_PAGES):
            if not result["queue"] or len(queue) >= result.get("queue_total", 0):
                break
            path = f"/v1/status?limit={STATUS_PAGE}&offset={len(queue)}"
            result = self.client.request("GET", path)
            queue.extend(result["queue"])
        result["queue"], result["queue_offset"] = queue, 0
        if self.reason:
            result["backend_reason"] = self.reason
        return result

    def updates(self, job_id: int) -> Iterator[JobUpdate]:
        delay = 0.05
        down_since: float | None = None
        while True:
            try:
                for event in self.client.stream(f"/v1/jobs/{job_id}/events"):
                    down_since, delay = None, 0.05
                    update = JobUpdate(
                        event["job"], event.get("holders", []), event.get("now", 0.0)
                    )
                    yield update
                    if update.finished:
                        return
            except SchedulerUnavailable:
                # The broker restarts: keep trying for a while, it reattaches our job.
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > RECONNECT_WINDOW:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def run(
        self,
        request: Request,
        on_update: UpdateCallback | None = None,
        stdout: IO[bytes] | int | None = None,
        stderr: IO[bytes] | int | None = None,
        launcher: Launcher | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Outcome:
        job = self.submit(request)
        lease = _Lease(self, job, on_update, stdout, stderr, launcher, dict(env or {}))
        lease.detached = request.detached
        return lease.run(request.command)

    # ------------------------------------------------------------------ lease calls

    def heartbeat(self, job_id: int) -> JobView:
        result: JobView = self.client.request("POST", f"/v1/jobs/{job_id}/heartbeat")
        return result

    def report_started(self, job_id: int, pid: int) -> JobView:
        return self._retrying("POST", f"/v1/jobs/{job_id}/started", {"pid": pid})

    def report_finish(self, job_id: int, exit_status: int) -> JobView:
        return self._retrying("POST", f"/v1/jobs/{job_id}/finish", {"exit_status": exit_status})

    def _retrying(self, method: str, path: str, body: Any) -> JobView:
        """Calls that must reach the broker even while it restarts."""
        deadline = time.monotonic() + RECONNECT_WINDOW
        while True:
            try:
                result: JobView = self.client.request(method, path, body)
                return result
            except SchedulerUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


class _Lease:
    """One job's life on the client side: wait, run the command, report its end."""

    def __init__(
        self,
        scheduler: BrokerScheduler,
        job: JobView,
        on_update: UpdateCallback | None,
        stdout: IO[bytes] | int | None,
        stderr: IO[bytes] | int | None,
        launcher: Launcher | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.launcher = launcher
        self.extra_env = extra_env or {}
        self.job = job
        self.job_id = int(job["id"])
        self.on_update = on_update
        self.stdout, self.stderr = stdout, stderr
        # One inbox for everything the main thread waits on: updates, the command's exit.
        self.inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.done = threading.Event()
        self.proc: CommandProcess | None = None
        self.detached = False  # the command may outlive this client (the broker watches it)

    def run(self, command: tuple[str, ...]) -> Outcome:
        threading.Thread(target=self._pump_updates, daemon=True, name="gpulane-updates").start()
        threading.Thread(target=self._send_heartbeats, daemon=True, name="gpulane-lease").start()
        try:
            return self._main_loop(command)
        except KeyboardInterrupt:
            self._withdraw_or_stop()
            raise
        finally:
            self.done.set()

    def _main_loop(self, command: tuple[str, ...]) -> Outcome:
        revoked = False
        while True:
            kind, item = self.inbox.get()
            if kind == "error":
                raise item
            if kind == "exited":
                final = self.scheduler.report_finish(self.job_id, item)
                return Outcome(_shell_status(item), final)
            update: JobUpdate = item
            self.job = update.job
            if self.on_update:
                self.on_update(update)
            if update.finished:
                if self.proc is not None and self.proc.poll() is None:
                    _stop_group(self.proc, signal.SIGKILL)
                status = self.proc.wait() if self.proc is not None else 1
                return Outcome(_shell_status(status) if self.proc else 1, update.job)
            if update.state == "running" and self.proc is None and not update.job.get("ending"):
                self._start(command, update.job)
            if update.job.get("ending") and not revoked:
                revoked = True
                if self.proc is not None:
                    threading.Thread(target=self._stop_command, args=(False,), daemon=True).start()

    def _start(self, command: tuple[str, ...], job: JobView) -> None:
        grant_env = job_environment(job)
        try:
            if self.launcher is not None:
                self.proc = self.launcher(grant_env)
            else:
                self.proc = spawn_command(
                    list(command),
                    {**os.environ, **self.extra_env, **grant_env},
                    self.stdout,
                    self.stderr,
                    death_signal=None if self.detached else signal.SIGKILL,
                )
        except OSError as error:
            self.scheduler.report_finish(self.job_id, 127)
            raise SchedulerError(f"cannot start {command[0]!r}: {error.strerror}") from None
        # If this fails the broker cannot kill the command for us; our own stop still works.
        # Over TCP it would always refuse (it cannot see our processes): our stop alone acts.
        if not self.scheduler.remote:
            with contextlib.suppress(SchedulerError):
                self.scheduler.report_started(self.job_id, self.proc.pid)
        proc = self.proc
        threading.Thread(
            target=lambda: self.inbox.put(("exited", proc.wait())), daemon=True, name="gpulane-wait"
        ).start()

    def _stop_command(self, interrupt: bool) -> None:
        """SIGINT (for a user's interrupt) or SIGTERM, then harder after a grace period."""
        proc = self.proc
        if proc is None:
            return
        steps = [signal.SIGINT, signal.SIGTERM] if interrupt else [signal.SIGTERM]
        for sig in steps:
            _stop_group(proc, sig)
            try:
                proc.wait(timeout=STOP_GRACE / len(steps))
                return
            except subprocess.TimeoutExpired:
                continue
        _stop_group(proc, signal.SIGKILL)

    def _withdraw_or_stop(self) -> None:
        if self.proc is None:
            with contextlib.suppress(SchedulerError):
                self.scheduler.cancel(self.job_id)
            return
        self._stop_command(interrupt=True)
        status = self.proc.wait()
        with contextlib.suppress(SchedulerError):
            # The user stopped it: recorded as "cancelled by USER", not as a failed exit status.
            # After the command's own SIGINT, so it saw KeyboardInterrupt (its finally blocks ran).
            self.scheduler.cancel(self.job_id)
            self.scheduler.report_finish(self.job_id, status)

    def _pump_updates(self) -> None:
        try:
            for update in self.scheduler.updates(self.job_id):
                if self.done.is_set():
                    return
                self.inbox.put(("update", update))
        except SchedulerError as error:
            self.inbox.put(("error", error))

    def _send_heartbeats(self) -> None:
        while not self.done.wait(self.scheduler.heartbeat_interval):
            with contextlib.suppress(SchedulerError):
                self.scheduler.heartbeat(self.job_id)


def job_environment(job: JobView) -> dict[str, str]:
    """What the command is told about its grant."""
    env = {
        "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in job.get("assigned_gpus") or []),
        # NVML numbers GPUs in PCI bus order; make CUDA agree so index N is the same card.
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        JOB_ID_ENV: str(job["id"]),
    }
    if job.get("gpu_memory_limit"):
        env[GPU_MEMORY_LIMIT_ENV] = str(job["gpu_memory_limit"])
        env[GPU_MEMORY_FRACTION_ENV] = str(job["gpu_memory_fraction"])
        # Read by JAX/XLA and TensorFlow at start, so a plain command (gpulane run) that
        # never imports gpulane is capped too; PyTorch needs a call (kernel/memory_caps.py).
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{float(job['gpu_memory_fraction'] or 0):.4f}"
        env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    if job.get("slices"):
        env[SLICES_ENV] = str(job["slices"])
    # An MPS client (broker/mps.py): its GPU by UUID, its daemon's folders, and the pinned
    # memory limit the driver enforces; replaces CUDA_VISIBLE_DEVICES' index.
    env.update(job.get("mps_env") or {})
    return env


def _stop_group(proc: CommandProcess, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _shell_status(status: int) -> int:
    """Popen's negative signal numbers as a shell reports them (128 + N)."""
    return 128 - status if status < 0 else status
