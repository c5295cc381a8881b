"""The broker SIGKILLed under load loses no accepted job, runs none twice and never
over-commits a GPU (issue 11).

A real broker with 2 simulated GPUs cut in 2 slices each, 40 ``gpulane run`` clients
as the three test users (whole-GPU and one-slice jobs, some cancelled with
``gpulane cancel``, some interrupted with SIGINT), and the broker killed with SIGKILL
and restarted on the same state folder and socket 4 times at random moments.

Each job's command appends a line to its own file when it starts and when it ends, with
the grant's environment and CLOCK_REALTIME in nanoseconds (the clock the broker stamps
its own times with). The recorded span lies inside the span the job really held its
GPU (written after the start, before the exit), so overlapping records are a real
over-commit; a job killed before it wrote its end is counted until the broker ended it.
Meanwhile a poller reads the broker's status every 0.2 s: a running job seen queued
again, or seen with a second start time, was granted twice. A job that keeps running
while the broker is down and is reattached afterwards keeps its one grant.

The seed is printed with the figures; ``GPULANE_TEST_SEED=N`` replays a run's schedule.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gpulane.errors import SchedulerError
from gpulane.scheduler.http import UnixJSONClient
from tests.support.broker import BrokerProcess

pytestmark = pytest.mark.usefixtures("unix_users")

USERS = ("gpl-alice", "gpl-bob", "gpl-carol")
GPUS, SLICES = 2, 2
CLIENTS = 40
KILLS = 4
LAUNCH_WINDOW = 12.0  # clients start over this many seconds
KILL_WINDOW = (1.5, 16.0)  # the kills fall at random moments in here
DEADLINE = 80.0  # every client has ended by then, or the test fails naming the ones that hang
ENDED = {"completed", "cancelled", "failed", "timeout"}
JOB_LINE = re.compile(r"^\[gpulane\] job (\d+)\b", re.M)
NO_BROKER = "no gpulane broker answers"

# The job: a start line, a sleep, an end line; a TERM or INT (a revoke, a cancel, an
# interrupt) still writes the end line before the command exits (143 or 130).
JOB_SCRIPT = """
import os, signal, sys, time
record, seconds = sys.argv[1], float(sys.argv[2])
def stamp(kind):
    env = os.environ
    line = (kind, str(time.time_ns()), env.get("GPULANE_JOB_ID", "-"),
            env.get("CUDA_VISIBLE_DEVICES") or "-", env.get("GPULANE_SLICES", "0"))
    with open(record, "a") as out:
        out.write(" ".join(line) + "\\n")
def stop(signum, frame):
    stamp("end")
    os._exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
stamp("start")
time.sleep(seconds)
stamp("end")
"""


@dataclass
class Client:
    tag: str
    user: str
    slices: int  # 0: one whole GPU
    seconds: float
    launch_at: float
    stop: str  # "", "cancel" (gpulane cancel as the same user) or "interrupt" (SIGINT)
    stop_after: float  # seconds after its job number is known
    folder: Path
    proc: subprocess.Popen[bytes] | None = None
    job_id: int | None = None
    known_at: float | None = None
    stopped: bool = False
    canceller: subprocess.Popen[bytes] | None = None

    @property
    def record(self) -> Path:
        return self.folder / f"rec-{self.tag}"

    @property
    def stderr(self) -> Path:
        return self.folder / f"err-{self.tag}"

    def start(self, broker: BrokerProcess) -> None:
        share = ["--slices", str(self.slices)] if self.slices else ["--gpus", "1"]
        argv = broker.gpulane(
            self.user,
            "run",
            *share,
            "--time",
            "5m",
            "--name",
            self.tag,
            "--",
            sys.executable,
            "-c",
            JOB_SCRIPT,
            str(self.record),
            f"{self.seconds:.2f}",
        )
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                argv, env=broker.env(self.user), stdout=subprocess.DEVNULL, stderr=err
            )

    def read_job_id(self) -> int | None:
        if self.job_id is None and self.stderr.exists():
            found = JOB_LINE.search(self.stderr.read_text(errors="replace"))
            if found:
                self.job_id = int(found.group(1))
                self.known_at = time.monotonic()
        return self.job_id


@dataclass
class Poller:
    """Reads the broker's status as root every 0.2 s and notes every sign of a second grant."""

    socket: Path
    started: dict[int, float] = field(default_factory=dict)  # job -> its one start time
    regrants: dict[int, str] = field(default_factory=dict)  # job -> the first sign
    overcommits: list[str] = field(default_factory=list)
    max_claimed: Counter[int] = field(default_factory=Counter)
    reads: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        client = UnixJSONClient(self.socket, timeout=5)
        while not self.done.wait(0.2):
            try:
                snapshot = client.request("GET", "/v1/status?limit=1000")
            except SchedulerError:
                client.close()  # the broker is down or restarting
                continue
            self.reads += 1
            self.look(snapshot)
        client.close()

    def look(self, snapshot: dict) -> None:
        in_use: Counter[int] = Counter()
        for job in snapshot["running"]:
            first = self.started.setdefault(job["id"], job["started_at"])
            if job["started_at"] != first:
                self.regrants.setdefault(
                    job["id"], f"job {job['id']} started at {first}, again at {job['started_at']}"
                )
            for gpu in job["assigned_gpus"]:
                in_use[gpu] += job["assigned_slices"]
        for job in snapshot["queue"]:
            if job["id"] in self.started:
                self.regrants.setdefault(job["id"], f"job {job['id']} ran, then was queued again")
        for gpu, used in in_use.items():
            self.max_claimed[gpu] = max(self.max_claimed[gpu], used)
            if used > SLICES:
                self.overcommits.append(f"broker status: GPU {gpu} has {used} slices in use")


def plan(rng: random.Random, folder: Path) -> list[Client]:
    clients = []
    for n in range(CLIENTS):
        stop = rng.choices(["", "cancel", "interrupt"], weights=[30, 6, 4])[0]
        clients.append(
            Client(
                tag=f"c{n:02d}",
                user=USERS[n % len(USERS)],
                slices=1 if rng.random() < 0.6 else 0,
                seconds=rng.uniform(0.4, 1.6),
                launch_at=rng.uniform(0.0, LAUNCH_WINDOW),
                stop=stop,
                stop_after=rng.uniform(0.2, 3.0),
                folder=folder,
            )
        )
    return sorted(clients, key=lambda c: c.launch_at)


def kill_times(rng: random.Random) -> list[float]:
    """KILLS moments in KILL_WINDOW, at least 2.5 s apart (a restart takes about 1 s)."""
    while True:
        times = sorted(rng.uniform(*KILL_WINDOW) for _ in range(KILLS))
        if all(b - a >= 2.5 for a, b in itertools.pairwise(times)):
            return times


def read_records(path: Path) -> list[tuple[str, int, str, str, int]]:
    """(kind, realtime ns, job id, CUDA_VISIBLE_DEVICES, slices) per line the job wrote."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        kind, stamp, job_id, devices, slices = line.split()
        rows.append((kind, int(stamp), job_id, devices, int(slices)))
    return rows


def max_in_use(spans: list[tuple[float, float, list[int], int]]) -> dict[int, int]:
    """The most slices in use at once per GPU; an end before a start at the same instant."""
    events = []
    for start, end, gpus, slices in spans:
        for gpu in gpus:
            events.append((start, 1, gpu, slices))
            events.append((end, 0, gpu, -slices))
    use: Counter[int] = Counter()
    peak: dict[int, int] = {gpu: 0 for gpu in range(GPUS)}
    for _, _, gpu, delta in sorted(events):
        use[gpu] += delta
        peak[gpu] = max(peak[gpu], use[gpu])
    return peak


def test_broker_sigkilled_under_load_loses_nothing_and_grants_nothing_twice(make_broker):
    seed = int(os.environ.get("GPULANE_TEST_SEED") or random.randrange(10**6))
    rng = random.Random(seed)
    broker = make_broker(
        "--simulate-gpus", str(GPUS), "--slices", str(SLICES), "--kill-grace", "2s"
    )
    folder = broker.folder / "records"
    folder.mkdir()
    folder.chmod(0o777)  # every test user writes its job's record here
    clients = plan(rng, folder)
    kills = kill_times(rng)
    poller = Poller(broker.socket)
    watcher = threading.Thread(target=poller.run, daemon=True)
    watcher.start()

    began = time.monotonic()
    pending, killed, downtime = list(clients), 0, 0.0
    try:
        while time.monotonic() - began < DEADLINE:
            now = time.monotonic() - began
            while pending and pending[0].launch_at <= now:
                client = pending.pop(0)
                client.start(broker)
            if killed < KILLS and kills[killed] <= now:
                down = time.monotonic()
                broker.kill9()
                time.sleep(rng.uniform(0.05, 1.0))  # clients meet a dead socket meanwhile
                broker.start()
                downtime += time.monotonic() - down
                killed += 1
            for client in clients:
                if client.proc is None or client.stopped or not client.stop:
                    continue
                if client.read_job_id() is None or client.proc.poll() is not None:
                    continue
                assert client.known_at is not None
                if time.monotonic() - client.known_at < client.stop_after:
                    continue
                client.stopped = True
                if client.stop == "interrupt":
                    client.proc.send_signal(signal.SIGINT)
                else:
                    client.canceller = subprocess.Popen(
                        broker.gpulane(client.user, "cancel", str(client.job_id)),
                        env=broker.env(client.user),
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                    )
            if (
                not pending
                and killed == KILLS
                and all(c.proc is not None and c.proc.poll() is not None for c in clients)
            ):
                break
            time.sleep(0.05)
        wall = time.monotonic() - began
        hung = [c.tag for c in clients if c.proc is None or c.proc.poll() is None]
    finally:
        poller.done.set()
        watcher.join(10)
        for client in clients:
            if client.proc is not None and client.proc.poll() is None:
                client.proc.kill()
            if client.proc is not None:
                client.proc.wait()
            if client.canceller is not None:
                client.canceller.communicate(timeout=30)
    assert hung == [], f"clients still running after {DEADLINE:.0f} s: {hung}\n{broker.log_text()}"
    assert killed == KILLS

    # What the broker knows of every job now (root is an admin: it sees them all).
    api = UnixJSONClient(broker.socket, timeout=10)
    jobs: dict[int, dict] = {}
    for job_id in range(1, 10 * CLIENTS):
        try:
            jobs[job_id] = api.request("GET", f"/v1/jobs/{job_id}")
        except SchedulerError:
            if job_id > max([*jobs, 0]) + 5:
                break
    api.close()
    by_tag: dict[str, list[dict]] = {}
    for job in jobs.values():
        by_tag.setdefault(job["name"], []).append(job)

    problems: list[str] = []
    spans: list[tuple[float, float, list[int], int]] = []
    # job (or client) -> the first sign of a second grant
    double_grants: dict[int | str, str] = dict(poller.regrants)
    states: Counter[str] = Counter()
    accepted = refused = 0
    lost: list[str] = []
    for client in clients:
        assert client.proc is not None
        code = client.proc.returncode
        err = client.stderr.read_text(errors="replace")
        records = read_records(client.record)
        starts = [r for r in records if r[0] == "start"]
        ends = [r for r in records if r[0] == "end"]
        theirs = by_tag.get(client.tag, [])
        if len(theirs) > 1:
            problems.append(
                f"{client.tag}: one submission, {len(theirs)} jobs {[j['id'] for j in theirs]}"
            )
        if len(starts) > 1:
            double_grants.setdefault(
                client.job_id or client.tag,
                f"{client.tag}: its command started {len(starts)} times: {starts}",
            )
        if client.read_job_id() is None:
            # Never accepted: the broker died during its submission, and the client said so.
            refused += 1
            if code != 1 or NO_BROKER not in err:
                problems.append(f"{client.tag}: no job number, exit {code}: {err[-300:]}")
            if starts:
                problems.append(f"{client.tag}: ran without a job number: {starts}")
            for job in theirs:  # saved before the broker died, its client gone by the restart
                if job["state"] != "cancelled":
                    problems.append(f"{client.tag}: unanswered submission is {job['state']}")
            continue
        accepted += 1
        job = jobs.get(client.job_id)
        if job is None or job["name"] != client.tag:
            lost.append(f"{client.tag}: job {client.job_id}: the broker does not know it")
            continue
        state = job["state"]
        states[state] += 1
        if state not in ENDED:
            lost.append(f"{client.tag}: job {client.job_id} is still {state}")
            continue
        if not client.stop and state != "completed":
            problems.append(
                f"{client.tag}: job {client.job_id} {state}: {job['message']}; {err[-300:]}"
            )
        if client.stop and state not in ("completed", "cancelled", "failed"):
            problems.append(f"{client.tag}: stopped job {client.job_id} is {state}")
        if state == "failed" and not (client.stop == "interrupt" and job["exit_status"] == 130):
            said = [ln for ln in broker.log_text().splitlines() if f"job {client.job_id} " in ln]
            problems.append(
                f"{client.tag} ({client.stop or 'not stopped'}, exit {code}): job "
                f"{client.job_id} failed: {job['message']}; records {records}; {err[-400:]}\n"
                + "\n".join(said)
            )
        # An interrupt that comes after the command's end still ends the client: with 130, or
        # by SIGINT itself where it lands after the job's end was reported (Python's way).
        expected = (0, 130, -signal.SIGINT) if client.stop == "interrupt" else (0,)
        if state == "completed" and (code not in expected or len(starts) != 1 or len(ends) != 1):
            problems.append(
                f"{client.tag}: completed but exit {code}, records {records}: {err[-300:]}"
            )
        if code == 0 and state != "completed":
            problems.append(f"{client.tag}: exit 0 but job {client.job_id} is {state}")
        if not starts:
            continue
        if starts[0][2] != str(client.job_id):
            problems.append(f"{client.tag}: ran as job {starts[0][2]}, not {client.job_id}")
        # The broker stamps a grant before the client hears of it: a command that started
        # before its job's grant time ran under an earlier grant of the same job.
        if job["started_at"] is None or starts[0][1] / 1e9 < job["started_at"]:
            double_grants.setdefault(
                client.job_id,
                f"{client.tag}: job {client.job_id} ran from {starts[0][1] / 1e9:.3f}, "
                f"before its grant at {job['started_at']}",
            )
        devices = ",".join(str(g) for g in job["assigned_gpus"] or [])
        if starts[0][3] != devices:
            problems.append(f"{client.tag}: ran on GPU {starts[0][3]}, granted {devices}")
        # Whole GPUs hold every slice; a job killed before its end line held until the broker ended it.
        end = ends[-1][1] / 1e9 if ends else job["ended_at"]
        gpus = [int(g) for g in starts[0][3].split(",")]
        spans.append((starts[0][1] / 1e9, end, gpus, starts[0][4] or SLICES))
    peak = max_in_use(spans)
    for gpu, used in peak.items():
        if used > SLICES:
            problems.append(f"GPU {gpu}: {used} slices in use at once by the jobs' own records")
    problems.extend(poller.overcommits)
    reattached = broker.log_text().count("reattached job")
    print(
        f"\nbroker SIGKILL under load: seed {seed}, {CLIENTS} clients, {killed} kills "
        f"({downtime:.1f} s down), {accepted} jobs accepted "
        f"({states['completed']} completed, {states['cancelled']} cancelled, "
        f"{states['failed']} failed: interrupted mid-run, exit 130), {refused} submissions cut by a kill, "
        f"{reattached} reattached, lost {len(lost)}, double grants {len(double_grants)}, "
        f"max slices in use per GPU {dict(peak)} of {SLICES}, "
        f"{poller.reads} status reads, {wall:.1f} s"
    )
    assert lost == [], lost
    assert double_grants == {}, "\n".join(double_grants.values())
    assert problems == [], "\n".join(problems) + "\n" + broker.log_text()[-4000:]
    assert accepted >= CLIENTS // 2  # the kills cut a few submissions, not most
