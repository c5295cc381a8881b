"""CUDA MPS, the process side: one control daemon per GPU, and which jobs are its clients.

The decisions are broker/mps.py's. Here: each GPU's pipe and log folders made private
from the moment they exist (``os.mkdir`` at 0700, then the mode MPS needs; an existing
folder that is a link, not root's, or writable by others is refused), the daemon
started with ``nvidia-cuda-mps-control -d`` (argv list) with ``CUDA_VISIBLE_DEVICES``
set to that GPU's UUID, found again by the pid file it writes in its pipe folder,
started again when it has died, and stopped with ``quit`` written to
``nvidia-cuda-mps-control`` (as NVIDIA's ``echo quit | nvidia-cuda-mps-control``) at
broker exit. A daemon that still has clients of running jobs is left running at exit
(the jobs outlive the broker, as they do without MPS) and adopted by the next broker.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from gpulane.broker import mps, procs
from gpulane.broker.store import JobRecord
from gpulane.jobs import JobState

log = logging.getLogger("gpulane.broker.mps")

START_TIMEOUT = 10.0  # seconds for `nvidia-cuda-mps-control -d` to fork and write its pid
QUIT_TIMEOUT = 10.0
CHECK_INTERVAL = 5.0  # seconds between the broker's checks that each daemon is alive
COMM = "nvidia-cuda-mps"  # /proc/PID/comm of nvidia-cuda-mps-control (15 characters kept)


def make_private(path: Path, mode: int) -> None:
    """Create ``path`` owner-only (root's), then give it ``mode``; an existing one must
    already be a root-owned folder nobody else can write in (else :class:`mps.MpsError`)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as error:
        raise mps.MpsError(f"cannot create {path}: {error.strerror}") from error
    info = os.lstat(path)
    why = mps.private_dir_problem(
        stat.S_IMODE(info.st_mode),
        info.st_uid,
        stat.S_ISDIR(info.st_mode),
        stat.S_ISLNK(info.st_mode),
        mode,
    )
    if why:
        raise mps.MpsError(f"{path} {why}; remove it, or start with {mps.OFF_FLAG}")
    os.chmod(path, mode)


def mig_modes(nvml: Any, count: int) -> dict[int, bool]:
    """Which GPUs are in MIG mode now (NVML's current mode; a GPU without MIG is not)."""
    modes = {}
    for index in range(count):
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(nvml.nvmlDeviceGetHandleByIndex(index))
            modes[index] = bool(current)
        except Exception:  # NVMLError_NotSupported: no MIG on this GPU
            modes[index] = False
    return modes


def daemon_pid(pipe: Path) -> int | None:
    """The pid of the control daemon serving ``pipe``, where it is alive."""
    try:
        pid = int((pipe / mps.PID_FILE).read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    return pid if comm.startswith(COMM) and state not in ("Z", "X") else None  # not a zombie


def is_mps_server(pid: int) -> bool:
    """Is ``pid`` an MPS server (``nvidia-cuda-mps-server``, run as its clients' user)
    started by a root control daemon? Such a process serves granted jobs: never a stray.
    A user cannot fake it: the parent must be root's ``nvidia-cuda-mps-control``."""
    parent = procs.parent_pid(pid)
    if parent is None or parent <= 1 or procs.owner_uid(parent) != 0:
        return False
    try:
        names = [Path(f"/proc/{p}/comm").read_text().strip() for p in (pid, parent)]
    except OSError:
        return False
    return all(name.startswith(COMM) for name in names)


class MpsDaemons:
    """The broker's MPS daemons, and each GPU's MPS clients (job id -> uid)."""

    def __init__(self, settings: mps.MpsSettings, base_env: Mapping[str, str] | None = None):
        self.settings = settings
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.clients: dict[int, dict[int, int]] = {}  # GPU -> {job id: uid}
        self.envs: dict[int, dict[str, str]] = {}  # job id -> what it is told
        self.decided: set[int] = set()  # running jobs already admitted or not
        self.restarts = 0

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    # ------------------------------------------------------------- daemons

    def start(self) -> None:
        """Make the folders and start (or adopt) each GPU's daemon."""
        if not self.enabled:
            return
        base = Path(self.settings.base)
        base.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        make_private(base, mps.BASE_MODE)
        for gpu in sorted(self.settings.gpus):
            pipe, logs = mps.folders(self.settings.base, gpu)
            make_private(pipe.parent, mps.BASE_MODE)
            make_private(pipe, mps.PIPE_MODE)
            make_private(logs, mps.LOG_MODE)
            pid = daemon_pid(pipe)
            if pid is not None:
                log.info("MPS daemon of GPU %d found running (pid %d): kept", gpu, pid)
            else:
                self._spawn(gpu)

    def alive(self, gpu: int) -> bool:
        return daemon_pid(mps.folders(self.settings.base, gpu)[0]) is not None

    def check(self) -> list[int]:
        """Start again every daemon that died; the GPUs restarted."""
        restarted = []
        for gpu in sorted(self.settings.gpus):
            if not self.alive(gpu):
                log.warning("MPS daemon of GPU %d is gone: starting it again", gpu)
                if self._spawn(gpu):
                    self.restarts += 1
                    restarted.append(gpu)
        return restarted

    def stop(self) -> None:
        """``quit`` each daemon without clients; one still serving running jobs stays."""
        for gpu in sorted(self.settings.gpus):
            pipe, _ = mps.folders(self.settings.base, gpu)
            if daemon_pid(pipe) is None:
                continue
            if self.clients.get(gpu):
                log.info(
                    "MPS daemon of GPU %d left running for job(s) %s",
                    gpu,
                    ", ".join(str(j) for j in sorted(self.clients[gpu])),
                )
                continue
            self._quit(gpu, pipe)

    def _spawn(self, gpu: int) -> bool:
        pipe, logs = mps.folders(self.settings.base, gpu)
        env = mps.daemon_env(self.base_env, self.settings.gpus[gpu], pipe, logs)
        # stderr to a file, not a pipe: the daemon's forked child could keep a pipe open.
        with tempfile.TemporaryFile() as errors:
            try:
                done = subprocess.run(
                    [self.settings.control, "-d"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=errors,
                    timeout=START_TIMEOUT,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as error:
                log.error("cannot start the MPS daemon of GPU %d: %s", gpu, error)
                return False
            errors.seek(0)
            said = errors.read(2000).decode(errors="replace").strip()
        deadline = time.monotonic() + START_TIMEOUT
        while daemon_pid(pipe) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = daemon_pid(pipe)
        if done.returncode or pid is None:
            why = said.splitlines()[-1] if said else f"exit status {done.returncode}, no pid file"
            log.error("the MPS daemon of GPU %d did not start: %s", gpu, why)
            return False
        log.info("MPS daemon of GPU %d started (pid %d, %s)", gpu, pid, pipe)
        return True

    def _quit(self, gpu: int, pipe: Path) -> None:
        try:
            done = subprocess.run(
                [self.settings.control],
                input="quit\n",
                env=mps.control_env(self.base_env, pipe),
                capture_output=True,
                text=True,
                timeout=QUIT_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            log.error("cannot stop the MPS daemon of GPU %d: %s", gpu, error)
            return
        if done.returncode:
            log.error("quit to the MPS daemon of GPU %d: exit status %d", gpu, done.returncode)
        else:
            log.info("MPS daemon of GPU %d stopped", gpu)

    # ------------------------------------------------------------- clients

    def adopt(self, jobs: Iterable[JobRecord], limit_of: Callable[[JobRecord], int | None]) -> None:
        """At broker start: every running job that could be an MPS client counts as one
        (which of them is, the broker cannot know; counting all only admits fewer)."""
        for job in jobs:
            gpu = mps.shared_gpu(job.assigned_gpus, limit_of(job))
            if job.state is JobState.RUNNING and gpu is not None and gpu in self.settings.gpus:
                self.clients.setdefault(gpu, {})[job.id] = job.uid
            if job.state is JobState.RUNNING:
                self.decided.add(job.id)

    def sync(self, jobs: Iterable[JobRecord], limit_of: Callable[[JobRecord], int | None]) -> None:
        """Drop ended jobs; admit each newly running job on a shared MPS GPU where its
        user's server may serve it (mps.admits) and the daemon is alive."""
        if not self.enabled:
            return
        running = {job.id: job for job in jobs if job.state is JobState.RUNNING}
        for members in self.clients.values():
            for job_id in [j for j in members if j not in running]:
                del members[job_id]
        self.envs = {j: env for j, env in self.envs.items() if j in running}
        self.decided &= set(running)
        for job in running.values():
            if job.id in self.decided:
                continue
            self.decided.add(job.id)
            limit = limit_of(job)
            gpu = mps.shared_gpu(job.assigned_gpus, limit)
            if gpu is None or limit is None or gpu not in self.settings.gpus:
                continue
            members = self.clients.setdefault(gpu, {})
            if not mps.admits(members, job.uid):
                log.info(
                    "job %d runs without MPS: GPU %d's MPS server serves another user's jobs",
                    job.id,
                    gpu,
                )
                continue
            if not self.alive(gpu):
                log.warning("job %d runs without MPS: GPU %d's daemon is not running", job.id, gpu)
                continue
            members[job.id] = job.uid
            self.envs[job.id] = mps.client_env(self.settings, gpu, limit)

    def env_for(self, job_id: int) -> dict[str, str] | None:
        return self.envs.get(job_id)
