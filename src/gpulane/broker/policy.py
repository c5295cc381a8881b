"""Pure scheduling decisions: who runs next, what fits, when each queued job may start.

Nothing here does I/O or reads the clock: every function takes the state and
``now`` and returns a decision, so the rules can be property-tested and read
on their own.

The rules, in order:

1. A job that has waited longer than ``starvation_after`` is *overdue*. Overdue
   jobs go first, oldest first, and the first overdue job that does not fit
   reserves the machine: nothing behind it starts until it has started. This
   is what guarantees that no job waits forever.
2. Otherwise users are served by fair share: the user with the fewest recent
   GPU-seconds (decayed with a half-life, running jobs included) goes first;
   ties go to the user running fewer jobs, then to the older submission.
   Within one user, jobs run in the order they were submitted (FIFO).
3. A user at the per-user cap of running jobs waits; others pass them.
4. Whole-GPU jobs take GPUs with every slice free; slice jobs take the
   fullest GPU that still has room (best fit), keeping whole GPUs free.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class PolicyConfig:
    slices_per_gpu: int = 1
    max_running_per_user: int = 0  # 0: no cap
    default_time: int = 3600
    max_time: int = 24 * 3600
    half_life: float = 24 * 3600.0
    starvation_after: float = 3600.0
    gpu_groups: frozenset[str] = frozenset()  # empty: every user may use GPUs
    admin_groups: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Assignment:
    """GPU indices and the slices taken on each (``slices == slices_per_gpu``: whole GPUs)."""

    gpus: tuple[int, ...]
    slices: int


@dataclass(frozen=True)
class Pending:
    id: int
    user: str
    gpus: int
    slices: int  # 0: whole GPUs
    time_limit: int
    submitted_at: float


@dataclass(frozen=True)
class Active:
    id: int
    user: str
    assignment: Assignment
    started_at: float
    time_limit: int


@dataclass(frozen=True)
class Usage:
    """Decayed GPU-seconds of one user, as of ``at``."""

    value: float = 0.0
    at: float = 0.0

    def decayed(self, now: float, half_life: float) -> float:
        if half_life <= 0:
            return 0.0
        return self.value * math.pow(0.5, max(0.0, now - self.at) / half_life)

    def add(self, gpu_seconds: float, now: float, half_life: float) -> Usage:
        return Usage(self.decayed(now, half_life) + gpu_seconds, now)


@dataclass(frozen=True)
class State:
    gpu_count: int
    queued: tuple[Pending, ...] = ()
    running: tuple[Active, ...] = ()
    usage: Mapping[str, Usage] = field(default_factory=dict)


@dataclass(frozen=True)
class Grant:
    job_id: int
    assignment: Assignment


@dataclass(frozen=True)
class Waiting:
    """Why a queued job waits, where it stands, and (if honest) when it should start."""

    position: int
    reason: str  # resources | fair_share | priority | user_cap | reserved | never_fits
    eta: float | None


def gpu_share(assignment: Assignment, slices_per_gpu: int) -> float:
    """GPU-equivalents held: two whole GPUs are 2.0, one slice of four is 0.25."""
    return len(assignment.gpus) * assignment.slices / slices_per_gpu


def free_slices(gpu_count: int, running: Iterable[Active], slices_per_gpu: int) -> list[int]:
    free = [slices_per_gpu] * gpu_count
    for job in running:
        for index in job.assignment.gpus:
            free[index] -= job.assignment.slices
    return free


def fits_machine(gpus: int, slices: int, gpu_count: int, slices_per_gpu: int) -> str | None:
    """``None`` if a request could ever run here, else the reason it never can."""
    if slices:
        if slices > slices_per_gpu:
            return (
                f"asks for {slices} slices but each GPU here is cut into {slices_per_gpu}; "
                f"ask for at most --slices {slices_per_gpu}, or --gpus 1"
            )
        if gpu_count == 0:
            return "there are no GPUs on this machine"
    elif gpus > gpu_count:
        return f"asks for {gpus} GPUs but this machine has {gpu_count}"
    return None


def fit(job: Pending, free: Sequence[int], slices_per_gpu: int) -> Assignment | None:
    if job.slices:
        candidates = [(room, i) for i, room in enumerate(free) if room >= job.slices]
        if not candidates:
            return None
        _, index = min(candidates)  # best fit: the fullest GPU that still has room
        return Assignment((index,), job.slices)
    whole = [i for i, room in enumerate(free) if room == slices_per_gpu]
    if len(whole) < job.gpus:
        return None
    return Assignment(tuple(whole[: job.gpus]), slices_per_gpu)


def user_usage(state: State, now: float, config: PolicyConfig) -> dict[str, float]:
    """Recent GPU-seconds per user: decayed history plus what running jobs used so far."""
    totals = {user: u.decayed(now, config.half_life) for user, u in state.usage.items()}
    for job in state.running:
        used = max(0.0, now - job.started_at) * gpu_share(job.assignment, config.slices_per_gpu)
        totals[job.user] = totals.get(job.user, 0.0) + used
    return totals


def order_queue(state: State, now: float, config: PolicyConfig) -> list[Pending]:
    """The queue in the order jobs will be considered: overdue first, then fair share."""
    usage = user_usage(state, now, config)
    running_count: dict[str, int] = {}
    for active in state.running:
        running_count[active.user] = running_count.get(active.user, 0) + 1
    overdue = sorted(
        (j for j in state.queued if now - j.submitted_at >= config.starvation_after),
        key=lambda j: (j.submitted_at, j.id),
    )
    overdue_ids = {j.id for j in overdue}
    per_user: dict[str, list[Pending]] = {}
    for job in sorted(state.queued, key=lambda j: (j.submitted_at, j.id)):
        if job.id not in overdue_ids:
            per_user.setdefault(job.user, []).append(job)
    # Interleave users: repeatedly take the head job of the user who is owed most,
    # counting each job already placed ahead as if it ran (so one user's five jobs
    # do not all go before another user's one).
    placed_count = dict(running_count)
    ordered: list[Pending] = list(overdue)
    while per_user:
        user = min(
            per_user,
            key=lambda u: (usage.get(u, 0.0), placed_count.get(u, 0), per_user[u][0].submitted_at),
        )
        job = per_user[user].pop(0)
        ordered.append(job)
        placed_count[user] = placed_count.get(user, 0) + 1
        if not per_user[user]:
            del per_user[user]
    return ordered


def decide(state: State, now: float, config: PolicyConfig) -> list[Grant]:
    """The jobs to start now, and where."""
    grants, _ = _pass(state, now, config)
    return grants


def _pass(state: State, now: float, config: PolicyConfig) -> tuple[list[Grant], dict[int, str]]:
    free = free_slices(state.gpu_count, state.running, config.slices_per_gpu)
    running_count: dict[str, int] = {}
    for active in state.running:
        running_count[active.user] = running_count.get(active.user, 0) + 1
    grants: list[Grant] = []
    reasons: dict[int, str] = {}
    reserved = False
    for job in order_queue(state, now, config):
        if fits_machine(job.gpus, job.slices, state.gpu_count, config.slices_per_gpu):
            reasons[job.id] = "never_fits"
            continue
        if reserved:
            reasons[job.id] = "reserved"
            continue
        cap = config.max_running_per_user
        if cap and running_count.get(job.user, 0) >= cap:
            reasons[job.id] = "user_cap"
            continue
        assignment = fit(job, free, config.slices_per_gpu)
        if assignment is None:
            reasons[job.id] = "resources"
            if now - job.submitted_at >= config.starvation_after:
                reserved = True  # hold what frees up for the overdue job
            continue
        for index in assignment.gpus:
            free[index] -= assignment.slices
        running_count[job.user] = running_count.get(job.user, 0) + 1
        grants.append(Grant(job.id, assignment))
    return grants, reasons


def explain(
    state: State, now: float, config: PolicyConfig, horizon: int = 500
) -> dict[int, Waiting]:
    """Position, reason and estimated start for every queued job.

    The estimate replays the queue forward assuming every running job uses its
    whole time limit, so it is an upper bound unless higher-priority work
    arrives. Jobs beyond ``horizon`` places, or that can never run, get ``None``.
    """
    ordered = order_queue(state, now, config)
    _, reasons = _pass(state, now, config)
    etas = _replay(state, now, config, ordered[:horizon])
    # Number jobs in the order the replay starts them, so a later position never
    # gets an earlier ETA (running jobs' growing usage can reorder users); jobs
    # with no estimate keep their priority order, last (the sort is stable).
    ordered.sort(key=lambda j: (j.id not in etas, etas.get(j.id, 0.0)))
    result: dict[int, Waiting] = {}
    latest_ahead = -math.inf
    for position, job in enumerate(ordered, start=1):
        reason = reasons.get(job.id, "resources")
        if reason == "resources" and position > 1:
            # Overtaken by someone who submitted later: that is fair share at work.
            reason = "fair_share" if latest_ahead > job.submitted_at else "priority"
        result[job.id] = Waiting(position, reason, etas.get(job.id))
        latest_ahead = max(latest_ahead, job.submitted_at)
    return result


def _replay(
    state: State, now: float, config: PolicyConfig, considered: list[Pending]
) -> dict[int, float]:
    """Simulate grants forward in time using time limits as run times."""
    sim = replace(state, queued=tuple(considered))
    clock = now
    etas: dict[int, float] = {}
    for _ in range(len(considered) + len(state.running) + 1):
        for grant in decide(sim, clock, config):
            job = next(j for j in sim.queued if j.id == grant.job_id)
            etas[job.id] = clock
            sim = replace(
                sim,
                queued=tuple(j for j in sim.queued if j.id != job.id),
                running=(
                    *sim.running,
                    Active(job.id, job.user, grant.assignment, clock, job.time_limit),
                ),
            )
        if not sim.queued or not sim.running:
            break
        clock = max(clock, min(j.started_at + j.time_limit for j in sim.running))
        # Finished jobs' GPU-seconds go into their users' history, as the broker
        # records them; dropping them would let a user who just ran go first again.
        usage = dict(sim.usage)
        for j in sim.running:
            if j.started_at + j.time_limit <= clock:
                used = (clock - j.started_at) * gpu_share(j.assignment, config.slices_per_gpu)
                usage[j.user] = usage.get(j.user, Usage()).add(used, clock, config.half_life)
        sim = replace(
            sim,
            running=tuple(j for j in sim.running if j.started_at + j.time_limit > clock),
            usage=usage,
        )
    return etas


def may_use_gpus(groups: Iterable[str], config: PolicyConfig, is_admin: bool = False) -> bool:
    return is_admin or not config.gpu_groups or bool(config.gpu_groups.intersection(groups))


def is_admin(uid: int, groups: Iterable[str], config: PolicyConfig) -> bool:
    return uid == 0 or bool(config.admin_groups.intersection(groups))
