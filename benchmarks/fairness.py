"""Fair share under overload: public GPU traces replayed through the broker's policy, in
simulated time, with strict FIFO, the old rules and the new ones side by side.

    .venv/bin/python benchmarks/fairness.py                 # the documented run
    .venv/bin/python benchmarks/fairness.py --jobs 600      # a quick look

Jobs come from ``openb_pod_list_default.csv`` (sizes from ``num_gpu``/``gpu_milli``,
run times from the pod times) and ``philly_runtime.csv`` (short jobs), assigned to
six users of whom one submits 40%, arriving faster than the machine (4 GPUs cut
into 4 slices) serves them. Each job declares a time limit 1.2-3x its run time.
The event loop drives ``policy.decide`` as ``broker/core.py`` does: after every
arrival and end, with usage recorded when a job ends (each second decayed by its age,
``policy.run_usage``, as the broker records it). Seeded: the same arguments
give the same table. The old rules are this repository's policy as of
``OLD_RULES`` (read with ``git show``).
"""

from __future__ import annotations

import argparse
import csv
import heapq
import importlib.util
import math
import random
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from gpulane.broker import policy

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "traces"
OLD_RULES = "157ecf0"  # the last commit with overdue-first rules and a whole-machine hold
GPUS, SLICES = 4, 4
USERS = ("heavy", "ann", "bob", "cat", "dan", "eve")
MIX = (0.40, 0.12, 0.12, 0.12, 0.12, 0.12)
WINDOW = 3600.0


@dataclass(frozen=True)
class Job:
    id: int
    user: str
    gpus: int
    slices: int  # 0: whole GPUs
    run: float
    limit: int
    arrival: float

    @property
    def share(self) -> float:
        return self.gpus if not self.slices else self.slices / SLICES


def load_jobs(count: int, seed: int, overload: float, traces: Path) -> list[Job]:
    rng = random.Random(seed)
    pods = []
    with open(traces / "openb_pod_list_default.csv") as handle:
        for row in csv.DictReader(handle):
            gpus, milli = int(row["num_gpu"]), int(row["gpu_milli"])
            if gpus == 0 or not row["deletion_time"]:
                continue
            begin = int(row["scheduled_time"] or row["creation_time"])
            run = min(3 * 3600.0, max(120.0, (int(row["deletion_time"]) - begin) / 100))
            if gpus > 1 or milli >= 1000:
                pods.append((min(gpus, GPUS), 0, run))
            else:
                pods.append((1, max(1, math.ceil(milli / (1000 / SLICES))), run))
    with open(traces / "philly_runtime.csv") as handle:
        shorts = [min(3600.0, max(30.0, float(r["runtime"]))) for r in csv.DictReader(handle)]
    drawn = []
    for _ in range(count):
        if rng.random() < 0.3:
            drawn.append((1, rng.choice((1, 1, 2)), rng.choice(shorts)))
        else:
            drawn.append(rng.choice(pods))
    work = sum(run * (g if not s else s / SLICES) for g, s, run in drawn)
    rate = overload * GPUS / (work / count)  # jobs per second, ``overload`` times capacity
    jobs, clock = [], 0.0
    for index, (gpus, slices, run) in enumerate(drawn, start=1):
        clock += rng.expovariate(rate)
        limit = min(24 * 3600, math.ceil(run * rng.uniform(1.2, 3.0) / 60) * 60)
        user = rng.choices(USERS, MIX)[0]
        jobs.append(Job(index, user, gpus, slices, run, limit, clock))
    return jobs


# ------------------------------------------------------------------ the rules


Running = dict[int, tuple[Job, Any, float]]
Decide = Callable[[list[Job], Running, dict[str, Any], float], list[tuple[int, Any]]]


def policy_rules(module: ModuleType, config: Any, held: dict[int, float] | None) -> Decide:
    """The broker's policy (this one or an old copy) as the simulation's rule; ``held``
    collects, per held job that started so, its start minus its reservation."""
    reservations: dict[tuple[int, float], float] = {}

    def decide(
        queued: list[Job], running: Running, usage: dict[str, Any], now: float
    ) -> list[tuple[int, Any]]:
        state = module.State(
            GPUS,
            tuple(
                module.Pending(j.id, j.user, j.gpus, j.slices, j.limit, j.arrival) for j in queued
            ),
            tuple(
                module.Active(j.id, j.user, a, start, j.limit) for j, a, start in running.values()
            ),
            usage,
        )
        if held is None:
            return [(g.job_id, g.assignment) for g in module.decide(state, now, config)]
        decided = module.plan(state, now, config)
        if decided.reserved_at is not None and decided.held is not None:
            # One reservation per wait: a held job whose own user starts or ends another
            # job meanwhile waits afresh (its user is not starving) and loses it.
            episode = (decided.held[0].id, decided.held[1])
            reservations.setdefault(episode, decided.reserved_at)
        for grant in decided.grants:
            if decided.held is not None and grant.job_id == decided.held[0].id:
                at = reservations.get((grant.job_id, decided.held[1]))
                if at is not None:
                    held[grant.job_id] = now - at  # <= 0: it started by its reservation
        return [(g.job_id, g.assignment) for g in decided.grants]

    return decide


def fifo_rules(module: ModuleType, config: Any) -> Decide:
    """Strict FIFO: jobs start in submission order; the first that does not fit blocks."""

    def decide(
        queued: list[Job], running: Running, usage: dict[str, Any], now: float
    ) -> list[tuple[int, Any]]:
        actives = [module.Active(j.id, j.user, a, s, j.limit) for j, a, s in running.values()]
        free = module.free_room(module.State(GPUS, (), tuple(actives)), config)
        grants = []
        for job in queued:
            pending = module.Pending(job.id, job.user, job.gpus, job.slices, job.limit, job.arrival)
            assignment = module.fit(pending, free, SLICES)
            if assignment is None:
                break
            free.take(assignment, SLICES)
            grants.append((job.id, assignment))
        return grants

    return decide


def old_policy() -> ModuleType:
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{OLD_RULES}:src/gpulane/broker/policy.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    spec = importlib.util.spec_from_loader("gpulane_old_policy", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, f"{OLD_RULES}:policy.py", "exec"), module.__dict__)
    return module


# ------------------------------------------------------------------ the event loop


@dataclass
class Outcome:
    start: dict[int, float] = field(default_factory=dict)
    end: dict[int, float] = field(default_factory=dict)
    held: dict[int, float] = field(default_factory=dict)  # job -> start - its reservation


def simulate(
    jobs: list[Job],
    decide: Decide,
    module: ModuleType,
    half_life: float,
    gpus: int = GPUS,
    slices_per_gpu: int = SLICES,
) -> Outcome:
    """Arrivals and ends in time order; ``decide`` after each, as ``broker/core.py`` does."""

    def share(job: Job) -> float:
        return job.gpus if not job.slices else job.slices / slices_per_gpu

    out = Outcome()
    events: list[tuple[float, int, int]] = [(j.arrival, 1, j.id) for j in jobs]  # 0: end
    heapq.heapify(events)
    by_id = {j.id: j for j in jobs}
    queued: list[Job] = []
    running: dict[int, tuple[Job, Any, float]] = {}
    usage: dict[str, Any] = {}
    while events:
        now = events[0][0]
        while events and events[0][0] == now:
            _, kind, job_id = heapq.heappop(events)
            job = by_id[job_id]
            if kind == 1:
                queued.append(job)
            else:
                _, _, began = running.pop(job_id)
                used = (now - began) * share(job)
                if hasattr(module, "run_usage"):  # each second decayed by its age, as core.py
                    used = module.run_usage(share(job), now - began, half_life)
                usage[job.user] = usage.get(job.user, module.Usage()).add(used, now, half_life)
                out.end[job_id] = now
        if sum(share(j) for j, _, _ in running.values()) >= gpus or not queued:
            continue
        grants = decide(queued, running, usage, now)
        granted = {job_id for job_id, _ in grants}
        for job_id, assignment in grants:
            job = by_id[job_id]
            running[job_id] = (job, assignment, now)
            out.start[job_id] = now
            heapq.heappush(events, (now + job.run, 0, job_id))
        queued = [j for j in queued if j.id not in granted]
    return out


# ------------------------------------------------------------------ the figures


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan


def jain(values: list[float]) -> float:
    total = sum(values)
    return total * total / (len(values) * sum(v * v for v in values)) if total else 1.0


def max_min(demands: list[float], capacity: float) -> list[float]:
    """Max-min fair split of ``capacity`` given each user's demand (water-filling)."""
    fair = [0.0] * len(demands)
    left, open_ = capacity, sorted(range(len(demands)), key=lambda i: demands[i])
    while open_:
        level = left / len(open_)
        i = open_[0]
        if demands[i] <= level:
            fair[i], left = demands[i], left - demands[i]
            open_.pop(0)
        else:
            for i in open_:
                fair[i] = level
            break
    return fair


def covered(intervals: list[tuple[float, float]], lo: float, hi: float) -> bool:
    """Whether the union of ``intervals`` (sorted by start) covers [lo, hi]."""
    reach = lo
    for a, b in intervals:
        if a > reach:
            return False
        reach = max(reach, b)
        if reach >= hi:
            return True
    return reach >= hi


def figures(jobs: list[Job], out: Outcome) -> dict[str, Any]:
    waits = {u: [out.start[j.id] - j.arrival for j in jobs if j.user == u] for u in USERS}
    light = [w for u in USERS[1:] for w in waits[u]]
    first = min(j.arrival for j in jobs)
    makespan = max(out.end.values()) - first
    work = sum(j.run * j.share for j in jobs)
    queued_spans = {
        u: sorted((j.arrival, out.start[j.id]) for j in jobs if j.user == u) for u in USERS
    }
    indices, aware = [], []
    for w in range(int(makespan // WINDOW)):
        lo, hi = first + w * WINDOW, first + (w + 1) * WINDOW
        waiting = [u for u in USERS if covered(queued_spans[u], lo, hi)]
        if len(waiting) < 4:
            continue
        gpu_time = dict.fromkeys(waiting, 0.0)
        for j in jobs:
            if j.user in gpu_time:
                overlap = min(hi, out.end[j.id]) - max(lo, out.start[j.id])
                gpu_time[j.user] += max(0.0, overlap) * j.share
        indices.append(jain(list(gpu_time.values())))
        # Demand-aware (classic Jain): each user's GPU time over their max-min fair part
        # given demand (what they held plus what their queued jobs asked for meanwhile).
        demand = dict(gpu_time)
        for j in jobs:
            if j.user in demand:
                demand[j.user] += max(0.0, min(hi, out.start[j.id]) - max(lo, j.arrival)) * j.share
        fair = max_min([min(d, GPUS * WINDOW) for d in demand.values()], GPUS * WINDOW)
        ratios = [g / f for g, f in zip(gpu_time.values(), fair, strict=True) if f > 0]
        aware.append(jain(ratios))
    rho = 0.0
    for u in USERS:
        mine = sorted((j for j in jobs if j.user == u), key=lambda j: j.arrival)
        clock = mine[0].arrival
        for j in mine:  # alone on a 1/N share of the machine, as a fluid
            clock = max(clock, j.arrival) + j.run * j.share / (GPUS / len(USERS))
        alone = clock - mine[0].arrival
        here = max(out.end[j.id] for j in mine) - mine[0].arrival
        rho = max(rho, here / alone)
    beyond = list(out.held.values())
    return {
        "waits": waits,
        "light_median": statistics.median(light),
        "jain": statistics.median(indices) if indices else math.nan,
        "windows": len(indices),
        "jain_demand": statistics.median(aware) if aware else math.nan,
        "makespan": makespan,
        "utilization": work / (GPUS * makespan),
        "rho": rho,
        "held": len(beyond),
        "beyond": max(beyond, default=0.0),
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    base = results[names[0]]
    lines = ["metric".ljust(44) + "".join(f"{n:>14}" for n in names) + f"{'new/FIFO':>10}"]
    lines.append("-" * len(lines[0]))

    def row(label: str, values: list[float], fmt: str, ratio: bool = True) -> None:
        cells = "".join(f"{format(v, fmt):>14}" for v in values)
        tail = f"{values[-1] / values[0]:>9.2f}x" if ratio and values[0] else f"{'-':>10}"
        lines.append(label.ljust(44) + cells + tail)

    for u in USERS:
        share = sum(1 for _ in base["waits"][u])
        for q, label in ((0.5, "median"), (0.9, "p90")):
            values = [percentile(r["waits"][u], q) for r in results.values()]
            row(f"wait {label}, {u} ({share} jobs) (s)", values, ".0f")
    row("light users' median wait (s)", [r["light_median"] for r in results.values()], ".0f")
    row("Jain, 1-h windows >= 4 users waiting (med)", [r["jain"] for r in results.values()], ".3f")
    row("  windows counted", [r["windows"] for r in results.values()], ".0f", ratio=False)
    row(
        "  not the target: Jain over max-min fair (med)",
        [r["jain_demand"] for r in results.values()],
        ".3f",
    )
    row("makespan (h)", [r["makespan"] / 3600 for r in results.values()], ".2f")
    row("utilization", [r["utilization"] for r in results.values()], ".3f")
    row("largest finish-time unfairness (rho)", [r["rho"] for r in results.values()], ".2f")
    row("held jobs started on a reservation", [r["held"] for r in results.values()], ".0f", False)
    row(
        "latest start beyond reservation (s)", [r["beyond"] for r in results.values()], ".0f", False
    )
    return "\n".join(lines)


def targets(results: dict[str, dict[str, Any]]) -> str:
    fifo, new = results["FIFO"], results["new rules"]
    checks = [
        ("Jain median >= 0.95", f"{new['jain']:.3f}", new["jain"] >= 0.95),
        (
            "light users' median wait <= FIFO's / 2",
            f"{new['light_median']:.0f} s vs {fifo['light_median'] / 2:.0f} s",
            new["light_median"] <= fifo["light_median"] / 2,
        ),
        (
            "makespan <= FIFO's",
            f"{new['makespan'] / 3600:.2f} h vs {fifo['makespan'] / 3600:.2f} h",
            new["makespan"] <= fifo["makespan"],
        ),
        (
            "no held job starts after its reservation",
            f"{new['beyond']:.0f} s",
            new["beyond"] <= 0,
        ),
    ]
    return "\n".join(f"  {name}: {got}  {'PASS' if ok else 'MISS'}" for name, got, ok in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--overload", type=float, default=1.5, help="offered load / capacity")
    parser.add_argument("--starvation-after", type=float, default=3600.0, help="seconds")
    parser.add_argument(
        "--half-life", type=float, default=policy.PolicyConfig().half_life, help="seconds"
    )
    parser.add_argument("--traces", type=Path, default=TRACES)
    args = parser.parse_args(argv)
    jobs = load_jobs(args.jobs, args.seed, args.overload, args.traces)
    old = old_policy()
    common = {"slices_per_gpu": SLICES, "half_life": args.half_life}
    held: dict[int, float] = {}
    rules = {
        "FIFO": (fifo_rules(policy, policy.PolicyConfig(**common)), policy, None),
        "old rules": (
            policy_rules(
                old, old.PolicyConfig(starvation_after=args.starvation_after, **common), None
            ),
            old,
            None,
        ),
        "new rules": (
            policy_rules(
                policy, policy.PolicyConfig(starvation_after=args.starvation_after, **common), held
            ),
            policy,
            held,
        ),
    }
    results = {}
    for name, (decide, module, reservations) in rules.items():
        out = simulate(jobs, decide, module, args.half_life)
        if reservations is not None:
            out.held = reservations
        results[name] = figures(jobs, out)
    print(
        f"{len(jobs)} jobs, {len(USERS)} users ({MIX[0]:.0%} from {USERS[0]}), {GPUS} GPUs x "
        f"{SLICES} slices, offered load {args.overload}x, starvation_after "
        f"{args.starvation_after:.0f} s, half-life {args.half_life:.0f} s, seed {args.seed}\n"
    )
    print(table(results))
    print("\ntargets (new rules):")
    print(targets(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
