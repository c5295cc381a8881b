"""The GPU memory watchdog's loop in the broker: read per-process GPU memory every
interval, map each process to the job it belongs to, and act on
:func:`gpulane.broker.watchdog.decide` (warn, end after a grace, report or end strays).

Which job a process belongs to is judged here, from /proc, never from what a client
says: a process is a job's if it is the job's command (the PID and start time the
broker checked at ``/started``), in the command's process group (a group only
processes of the same session may join), or below the command in the process tree.

The readings come from NVML (``nvmlDeviceGetComputeRunningProcesses``) where the
GPUs are real, or from a JSON file (``--gpu-readings``, for tests and for sites that
read GPUs some other way): a list of ``{"gpu": 0, "pid": 123, "used": bytes}``.
A failed reading is logged once (per distinct error) and the loop goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from gpulane.broker import procs, watchdog
from gpulane.broker.gpus import Inventory
from gpulane.broker.mps_daemons import is_mps_server
from gpulane.broker.store import JobRecord
from gpulane.jobs import JobState, format_bytes
from gpulane.views import Stray

log = logging.getLogger("gpulane.broker.memory")

# A whole-GPU job has no memory grant below the card: it is never over.
NO_LIMIT = 1 << 62
MAX_READINGS = 100_000  # entries read from a readings file at most (it is the admin's)

Reader = Callable[[], list[watchdog.ProcessReading]]


@dataclass(frozen=True)
class WatchSettings:
    interval: float = 1.0  # seconds between readings
    grace: float = 5.0  # seconds a job may stay over its memory after the warning
    slack: int = 512 * 1024**2  # bytes over its grant tolerated (CUDA contexts)
    strays: str = "auto"  # auto (end where device access is enforced) | end | report
    readings_file: str = ""  # read per-process GPU memory from this file, not NVML


@dataclass(frozen=True)
class StrayView:
    """A process using a GPU that belongs to no grant, as status shows it."""

    gpu: int
    pid: int
    used: int
    user: str
    ended: bool


def file_reader(path: str) -> Reader:
    def read() -> list[watchdog.ProcessReading]:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            return []
        entries = json.loads(text) if text.strip() else []
        if not isinstance(entries, list):
            raise ValueError(f"{path}: not a JSON list of readings")
        return [
            watchdog.ProcessReading(int(e["gpu"]), int(e["pid"]), int(e["used"]))
            for e in entries[:MAX_READINGS]
        ]

    return read


def reader_for(settings: WatchSettings, inventory: Inventory) -> Reader | None:
    """The reading source: the file where one is given, else NVML where GPUs are real."""
    if settings.readings_file:
        return file_reader(settings.readings_file)
    nvml = inventory.nvml()
    if nvml is None:
        return None
    return lambda: watchdog.read_nvml(nvml, inventory.count)


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def live_commands(jobs: Iterable[JobRecord]) -> list[JobRecord]:
    """The jobs whose registered command is still the process the broker checked."""
    return [j for j in jobs if j.cmd_pid and procs.is_alive(j.cmd_pid, j.cmd_start)]


def job_of(
    pid: int, jobs: Iterable[JobRecord], live: list[JobRecord] | None = None
) -> JobRecord | None:
    """The running job ``pid`` belongs to (see the module's docstring), or None.

    A job whose command is not registered yet (just granted) also owns its client's
    descendants of the job's own user, so a command starting up is not a stray; a
    root client (the hub) never lends its tree so: its other children are others'.
    """
    jobs = list(jobs)
    live = live_commands(jobs) if live is None else live  # once per reading, not per PID
    commands = {j.cmd_pid: j for j in live}
    group = _group_of(pid)
    for key in (pid, group):
        if key in commands:
            return commands[key]
    # Its ancestors, read once (at most procs.MAX_ANCESTRY): the live commands' start
    # times were just checked, so a PID on this chain that is a command is that command.
    chain = _ancestors(pid)
    found = next((commands[a] for a in chain if a in commands), None)
    if found is not None:
        return found
    owner = procs.owner_uid(pid)
    for job in jobs:
        if job.cmd_pid or not job.client_pid or not job.uid or owner != job.uid:
            continue
        if (job.client_pid in chain or pid == job.client_pid) and procs.is_alive(
            job.client_pid, job.client_start
        ):
            return job
    return None


def _ancestors(pid: int) -> list[int]:
    chain: list[int] = []
    current = pid
    for _ in range(procs.MAX_ANCESTRY):
        parent = procs.parent_pid(current)
        if parent is None or parent <= 1:
            break
        chain.append(parent)
        current = parent
    return chain


class MemoryWatch:
    """Reads, decides and acts every ``interval``; what it saw is kept for the views."""

    def __init__(
        self,
        read: Reader,
        settings: WatchSettings,
        jobs: Callable[[], Iterable[JobRecord]],
        granted: Callable[[JobRecord], int | None],
        end_job: Callable[[int, str], None],
        changed: Callable[[set[int]], None],
        devices_enforced: Callable[[], bool],
    ) -> None:
        self.read = read
        self.settings = settings
        self.jobs = jobs
        self.granted = granted
        self.end_job = end_job
        self.changed = changed
        self.devices_enforced = devices_enforced
        self.used: dict[int, int] = {}  # job id -> bytes on its fullest GPU, last reading
        self.warnings: dict[int, str] = {}  # job id -> the warning it was given
        self.strays: list[StrayView] = []
        self._over_since: dict[int, float] = {}
        self._strays_seen: set[tuple[int, int]] = set()
        self._errors_logged: set[str] = set()
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(self.settings.interval, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.check(loop.time())
        except Exception as error:  # never die silently: log each kind once, go on
            key = f"{type(error).__name__}: {error}"
            if key not in self._errors_logged:
                self._errors_logged.add(key)
                log.exception("GPU memory reading failed (logged once; still trying)")
        self._handle = loop.call_later(self.settings.interval, self._tick)

    def of(self, job_id: int) -> tuple[int | None, str | None]:
        """The job's GPU memory in use by the last reading, and its warning if over."""
        return self.used.get(job_id), self.warnings.get(job_id)

    def stray_views(self) -> list[Stray]:
        return [
            {"gpu": s.gpu, "pid": s.pid, "used": s.used, "user": s.user, "ended": s.ended}
            for s in self.strays
        ]

    def _ends_strays(self) -> bool:
        if self.settings.strays == "auto":
            return self.devices_enforced()
        return self.settings.strays == "end"

    def check(self, now: float) -> None:
        """One reading, one decision, its actions."""
        # MPS servers (broker/mps_daemons.py) serve granted jobs' clients: not strays.
        readings = [r for r in self.read() if not is_mps_server(r.pid)]
        running = [j for j in self.jobs() if j.state is JobState.RUNNING]
        by_pid: dict[int, JobRecord] = {}
        live = live_commands(running)
        for pid in {r.pid for r in readings}:
            job = job_of(pid, running, live)
            if job is not None:
                by_pid[pid] = job
        holders = []
        for job in running:
            pids = frozenset(p for p, j in by_pid.items() if j.id == job.id)
            # A job being stopped still owns its processes (never strays) but is past warning.
            limit = None if job.ending_state is not None else self.granted(job)
            holders.append(
                watchdog.Holder(
                    job.id, pids, frozenset(job.assigned_gpus), NO_LIMIT if limit is None else limit
                )
            )
        ends_strays = self._ends_strays()
        decision = watchdog.decide(
            readings,
            holders,
            self._over_since,
            now,
            self.settings.grace,
            ends_strays,
            self.settings.slack,
        )
        self._over_since = dict(decision.over_since)
        self._record_use(readings, by_pid, running)
        touched: set[int] = set()
        for warn in decision.warnings:
            log.warning("job %d: %s", warn.job_id, warn.message)
            self.warnings[warn.job_id] = warn.message
            touched.add(warn.job_id)
        for job_id in [j for j in self.warnings if j not in self._over_since]:
            del self.warnings[job_id]  # back under its grant, or gone
            touched.add(job_id)
        for end in decision.ends:
            log.warning("job %d %s", end.job_id, end.message)
            self._over_since.pop(end.job_id, None)
            self.warnings.pop(end.job_id, None)
            self.end_job(end.job_id, end.message)
        self._handle_strays(decision.strays)
        if touched:
            self.changed(touched)

    def _record_use(
        self,
        readings: list[watchdog.ProcessReading],
        by_pid: dict[int, JobRecord],
        running: list[JobRecord],
    ) -> None:
        per_gpu: dict[tuple[int, int], int] = {}
        for reading in readings:
            job = by_pid.get(reading.pid)
            if job is not None and reading.gpu in job.assigned_gpus:
                key = (job.id, reading.gpu)
                per_gpu[key] = per_gpu.get(key, 0) + max(0, reading.used)
        self.used = {}
        for job in running:
            mine = [u for (j, _), u in per_gpu.items() if j == job.id]
            self.used[job.id] = max(mine, default=0)

    def _handle_strays(self, strays: Iterable[watchdog.Stray]) -> None:
        shown: list[StrayView] = []
        seen: set[tuple[int, int]] = set()
        for stray in strays:
            uid = procs.owner_uid(stray.pid)
            user = _user_name(uid)
            # Root's processes (the admin's tools) are reported, never ended.
            ended = stray.end and bool(uid) and self._end_stray(stray.pid)
            key = (stray.gpu, stray.pid)
            seen.add(key)
            if key not in self._strays_seen:
                log.warning(
                    "process %d of %s uses %s of GPU %d outside any grant%s",
                    stray.pid,
                    user,
                    format_bytes(stray.used),
                    stray.gpu,
                    ": ended" if ended else "",
                )
            shown.append(StrayView(stray.gpu, stray.pid, stray.used, user, ended))
        self._strays_seen = seen
        self.strays = shown

    @staticmethod
    def _end_stray(pid: int) -> bool:
        started = procs.start_time(pid)
        return started is not None and procs.kill_process(pid, started)


def _user_name(uid: int | None) -> str:
    if uid is None:
        return "?"
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
