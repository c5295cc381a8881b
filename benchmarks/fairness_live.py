"""Fair share through a real broker: `gpulane run` jobs as three Unix users, compared
with the pure policy's simulation of the same jobs (issue 13, second part).

    .venv/bin/python benchmarks/fairness_live.py     # as root, about 20 s

A ``gpulane broker --simulate-gpus 2 --slices 2`` process in a temporary folder;
gpl-alice (the heavy user) submits a burst of one-slice jobs, gpl-bob whole-GPU jobs
and gpl-carol one-slice jobs a little later, each a real ``gpulane run`` client
(``setpriv`` to the user) whose command sleeps a few seconds. When all have ended the
broker's own store gives each job's submission, start and end. The same jobs (those
submission times, each job's measured run time, the same time limits) then go through
``policy.decide`` in simulated time, called after every arrival and end as
``broker/core.py`` calls it, and the table puts the two side by side: the order jobs
started in and each job's wait. The users must exist (``scripts/test.sh`` makes them).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fairness  # this folder's trace replay: its event loop

from gpulane.broker import policy
from gpulane.broker.store import JobRecord, Store

GPUS, SLICES = 2, 2
LIMIT = 60  # seconds: every job's --time
# (user, seconds after the start, --slices (0: --gpus 1), run seconds)
WORKLOAD = (
    *((("gpl-alice", 0.15 * n, 1, 4.0)) for n in range(10)),
    ("gpl-bob", 2.0, 0, 4.0),
    ("gpl-carol", 2.5, 1, 3.0),
    ("gpl-bob", 3.0, 0, 3.0),
    ("gpl-carol", 3.5, 1, 3.0),
    ("gpl-carol", 9.0, 1, 2.0),
    ("gpl-bob", 9.5, 0, 2.0),
)


@dataclass(frozen=True)
class Ran:
    id: int
    user: str
    slices: int  # 0: one whole GPU
    submitted: float
    started: float
    ended: float


def run_live(folder: Path) -> list[Ran]:
    sock, state = folder / "run" / "broker.sock", folder / "state"
    argv = [sys.executable, "-m", "gpulane", "broker", "--socket", str(sock)]
    argv += ["--state-dir", str(state), "--simulate-gpus", str(GPUS), "--slices", str(SLICES)]
    argv += ["--max-submits-per-minute", "0"]
    log = open(folder / "broker.log", "wb")  # noqa: SIM115 (closed below)
    broker = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    clients: list[subprocess.Popen[bytes]] = []
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if broker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the broker did not start: see {folder / 'broker.log'}")
            time.sleep(0.05)
        began = time.monotonic()
        for user, at, slices, seconds in WORKLOAD:
            time.sleep(max(0.0, began + at - time.monotonic()))
            share = ["--slices", str(slices)] if slices else ["--gpus", "1"]
            command = [sys.executable, "-c", f"import time; time.sleep({seconds})"]
            env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": "/tmp"}
            env |= {"USER": user, "LANG": "C.UTF-8", "GPULANE_SOCKET": str(sock)}
            client = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]
            client += [sys.executable, "-m", "gpulane", "run", *share, "--time", f"{LIMIT}s"]
            clients.append(
                subprocess.Popen(
                    [*client, "--", *command],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for proc in clients:
            if proc.wait(timeout=300) != 0:
                raise SystemExit(f"a gpulane run client exited {proc.returncode}")
    finally:
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
        broker.terminate()
        broker.wait(15)
        log.close()
    store = Store(state / "broker.sqlite3")
    records: list[JobRecord] = store.ended_since(0.0)
    store.close()
    ran = []
    for r in records:
        assert r.id is not None and r.started_at is not None and r.ended_at is not None, r
        ran.append(Ran(r.id, r.user, r.slices, r.submitted_at, r.started_at, r.ended_at))
    return sorted(ran, key=lambda j: j.id)


def simulate(jobs: list[Ran], config: policy.PolicyConfig) -> dict[int, float]:
    """Start times under ``policy.decide`` for the same arrivals and run times, through
    the event loop of ``fairness.py``."""
    replayed = [
        fairness.Job(j.id, j.user, 1, j.slices, j.ended - j.started, LIMIT, j.submitted)
        for j in jobs
    ]

    def decide(
        queued: list[fairness.Job], running: fairness.Running, usage: dict[str, Any], now: float
    ) -> list[tuple[int, Any]]:
        state = policy.State(
            GPUS,
            tuple(policy.Pending(j.id, j.user, 1, j.slices, j.limit, j.arrival) for j in queued),
            tuple(policy.Active(j.id, j.user, a, s, j.limit) for j, a, s in running.values()),
            usage,
        )
        return [(g.job_id, g.assignment) for g in policy.decide(state, now, config)]

    out = fairness.simulate(replayed, decide, policy, config.half_life, GPUS, SLICES)
    return out.start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the broker's folder")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="gpulane-fair-live-"))
    folder.chmod(0o755)  # the users reach the socket inside
    try:
        jobs = run_live(folder)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    sim = simulate(jobs, policy.PolicyConfig(slices_per_gpu=SLICES))
    t0 = min(j.submitted for j in jobs)
    live_order = [j.id for j in sorted(jobs, key=lambda j: (j.started, j.id))]
    sim_order = sorted(sim, key=lambda i: (sim[i], i))
    print(
        f"{len(jobs)} gpulane run jobs, 3 users, {GPUS} simulated GPUs x {SLICES} slices, "
        f"time limit {LIMIT} s; times in seconds from the first submission\n"
    )
    print(
        f"{'job':>4} {'user':<10} {'size':<7} {'submit':>7} {'live start':>11} "
        f"{'sim start':>10} {'live-sim':>9}"
    )
    for j in jobs:
        size = f"{j.slices} slice" if j.slices else "1 GPU"
        print(
            f"{j.id:>4} {j.user:<10} {size:<7} {j.submitted - t0:>7.2f} {j.started - t0:>11.2f} "
            f"{sim[j.id] - t0:>10.2f} {j.started - sim[j.id]:>+9.2f}"
        )
    print("\nmedian wait per user (s):   live    sim")
    for user in sorted({j.user for j in jobs}):
        mine = [j for j in jobs if j.user == user]
        live = statistics.median(j.started - j.submitted for j in mine)
        pure = statistics.median(sim[j.id] - j.submitted for j in mine)
        print(f"  {user:<24}{live:>6.2f} {pure:>6.2f}")
    worst = max(abs(j.started - sim[j.id]) for j in jobs)
    same = live_order == sim_order
    print(f"\nstart order: live {live_order}")
    print(f"             sim  {sim_order}")
    print(f"same start order: {'yes' if same else 'NO'}; largest start difference {worst:.2f} s")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
