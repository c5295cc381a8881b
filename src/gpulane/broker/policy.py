"""Pure scheduling decisions: who runs next, what fits, when each queued job may start.

Nothing here does I/O or reads the clock: every function takes the state and
``now`` and returns a decision, so the rules can be property-tested and read
on their own.

The rules, in order:

1. Users are served by fair share: the user with the lowest *standing* goes
   first, that is recent GPU-seconds (decayed with a half-life, running jobs
   included, each second decayed by its age: :func:`run_usage`) divided by the user's share (:mod:`gpulane.broker.shares`); ties
   go to the user running fewer jobs, then to the older submission. Within one
   user, jobs run in the order they were submitted (FIFO). Waiting alone never
   reorders users, so a long queue stays fair instead of turning into FIFO.
   Each user who waits has a *part* of the machine: the GPUs not held by users
   with nothing waiting, split among those who wait by their shares. Users
   holding less than their part go first (the part counts each start, so one pass
   does not hand a user with a long queue every hole); a user holding their part or
   more starts nothing while one of them still waits for room (jobs are never
   preempted, so backfilling the heavy user into what a light user's job could
   not use yet handed the heavy user most of each hour), and the first such job
   that does not fit has the machine drain towards it: others start only where
   they end, by their time limits, before it fits, or leave it room.
2. No job starves: a job's *wait* counts from its submission or from the last
   time one of its user's jobs started or ended, whichever is later (a user who
   is getting GPU time is not starving). The job that has waited longest, once
   over ``starvation_after``, is *held*: it goes first, and if it does not fit
   it gets a reservation at the earliest time it fits, from the running jobs'
   time limits. Other jobs still start now if they fit in what is free and
   either end, by their own time limits, before the reservation or leave room
   for it (EASY backfill). So the held job starts by its reservation, and a
   whole-GPU job is not starved by a stream of slice jobs.
3. A user at the per-user cap of running jobs waits; others pass them.
4. Whole-GPU jobs take GPUs nobody holds; slice jobs and ``--gpu-mem`` jobs take
   the fullest GPU that still has room (best fit), keeping whole GPUs free. Room
   is counted twice, and a job fits where both have it: slices (a ``--gpu-mem``
   job takes none) and memory (a GPU offers its total less ``gpu_mem_reserve``;
   each holder declares its part, :mod:`gpulane.broker.gpu_memory`).
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from gpulane.broker import gpu_memory
from gpulane.broker.shares import Standing, effective_shares, standings


@dataclass(frozen=True)
class PolicyConfig:
    slices_per_gpu: int = 1
    max_running_per_user: int = 0  # 0: no cap
    default_time: int = 3600
    max_time: int = 24 * 3600
    half_life: float = 600.0  # 10 min: fair within the hour (docs/benchmarks.md)
    starvation_after: float = 3600.0
    gpu_groups: frozenset[str] = frozenset()  # empty: every user may use GPUs
    admin_groups: frozenset[str] = frozenset()
    # Fair-share weights (shares.py): per user (default 1), per group (split among the
    # group's members with jobs), and each user's share group.
    user_shares: Mapping[str, float] = field(default_factory=dict)
    group_shares: Mapping[str, float] = field(default_factory=dict)
    user_groups: Mapping[str, str] = field(default_factory=dict)
    # Bytes kept back on each GPU for CUDA contexts and the driver: not offered to jobs.
    gpu_mem_reserve: int = 0


@dataclass(frozen=True)
class Assignment:
    """GPU indices and the slices taken on each (``slices == slices_per_gpu``: whole GPUs);
    a ``--gpu-mem`` job takes no slice but ``gpu_mem`` bytes of its one GPU."""

    gpus: tuple[int, ...]
    slices: int
    gpu_mem: int | None = None


@dataclass(frozen=True)
class Pending:
    id: int
    user: str
    gpus: int
    slices: int  # 0: whole GPUs
    time_limit: int
    submitted_at: float
    gpu_mem: int | None = None  # bytes of one GPU (gpus and slices are then 1 and 0)


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


def run_usage(share: float, seconds: float, half_life: float) -> float:
    """What a run of ``seconds`` on ``share`` GPUs that ends now adds to its user's usage:
    each of its seconds decayed by its age, as if it had been added when it was used. So a
    job still running counts what it would count had it ended now, and a job of hours
    counts its first hours as faded as a finished job's (with a half-life of 10 minutes,
    a job that ran 3 hours counts about 14 GPU-minutes per GPU, not 180)."""
    if half_life <= 0 or seconds <= 0:
        return 0.0
    rate = math.log(2) / half_life
    return share * -math.expm1(-seconds * rate) / rate


@dataclass(frozen=True)
class State:
    gpu_count: int
    queued: tuple[Pending, ...] = ()
    running: tuple[Active, ...] = ()
    usage: Mapping[str, Usage] = field(default_factory=dict)
    gpu_memory: int = 0  # bytes per GPU (the inventory's); 0: unknown, no --gpu-mem job fits


@dataclass(frozen=True)
class Grant:
    job_id: int
    assignment: Assignment


@dataclass(frozen=True)
class Waiting:
    """Why a queued job waits, where it stands, and (if honest) when it should start."""

    position: int
    # resources | fair_share | priority | user_cap | held | reserved | draining | over_share
    # | never_fits
    reason: str
    eta: float | None
    # Fair-share standing: this user's, and the user it is compared with (for
    # fair_share the one who goes first, for the head of the queue the next in line).
    usage: float | None = None  # recent (decayed) GPU-seconds
    share: float | None = None
    other_user: str | None = None
    other_usage: float | None = None
    other_share: float | None = None
    # held: this job's own wait; reserved: the held job, its wait, and when it starts.
    held_job: int | None = None
    held_since: float | None = None
    held_until: float | None = None


def gpu_share(assignment: Assignment, slices_per_gpu: int, offer: int = 0) -> float:
    """GPU-equivalents held: two whole GPUs are 2.0, one slice of four is 0.25, 6 GiB of
    the 24 GiB a GPU offers (``offer``) 0.25 (a whole GPU where the offer is unknown)."""
    if assignment.gpu_mem is not None:
        return min(1.0, assignment.gpu_mem / offer) if offer > 0 else 1.0
    return len(assignment.gpus) * assignment.slices / slices_per_gpu


def offer(state: State, config: PolicyConfig) -> int:
    """The memory each GPU offers jobs: its total less the reserve."""
    return gpu_memory.offered(state.gpu_memory, config.gpu_mem_reserve)


@dataclass
class Room:
    """What is free on each GPU: slices, and memory (what the GPU offers less what its
    holders declared). A job fits a GPU only where both have room for it."""

    slices: list[int]
    mem: list[int]
    offer: int

    def copy(self) -> Room:
        return Room(list(self.slices), list(self.mem), self.offer)

    def take(self, assignment: Assignment, slices_per_gpu: int, sign: int = 1) -> None:
        """Take what ``assignment`` holds (``sign=-1``: give it back)."""
        held = gpu_memory.Held(0, assignment.slices, assignment.gpu_mem)
        need = gpu_memory.declared(held, self.offer, slices_per_gpu)
        for index in assignment.gpus:
            self.slices[index] -= sign * assignment.slices
            self.mem[index] -= sign * need

    def overdrawn(self) -> bool:
        return min(self.slices, default=0) < 0 or min(self.mem, default=0) < 0


def free_room(state: State, config: PolicyConfig) -> Room:
    spg = config.slices_per_gpu
    room = Room(
        [spg] * state.gpu_count, [offer(state, config)] * state.gpu_count, offer(state, config)
    )
    for job in state.running:
        room.take(job.assignment, spg)
    return room


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


def never_runs(job: Pending, state: State, config: PolicyConfig) -> str | None:
    """``None`` if ``job`` could ever run on this machine, else the reason it never can."""
    # Asked for every queued job in every pass, and the ETA replay makes hundreds of passes
    # over a long queue: the answer depends only on the request's shape and the machine.
    return _never_runs(
        job.gpus,
        job.slices,
        job.gpu_mem,
        state.gpu_count,
        state.gpu_memory,
        config.slices_per_gpu,
        config.gpu_mem_reserve,
    )


@functools.lru_cache(maxsize=256)
def _never_runs(
    gpus: int,
    slices: int,
    gpu_mem: int | None,
    gpu_count: int,
    memory: int,
    slices_per_gpu: int,
    reserve: int,
) -> str | None:
    if gpu_mem is None:
        return fits_machine(gpus, slices, gpu_count, slices_per_gpu)
    if gpu_count and memory <= 0:
        return (
            "asks for --gpu-mem but this broker does not know its GPUs' memory; ask for --slices N"
        )
    return gpu_memory.never_fits(gpu_mem, [memory] * gpu_count, reserve)


def fit(job: Pending, free: Room, slices_per_gpu: int) -> Assignment | None:
    """Where ``job`` fits now: whole GPUs nobody holds; else the fullest GPU (best fit)
    with room for its slices and the memory they declare, or for its ``--gpu-mem`` (on a
    GPU with a slice left: a GPU whose slices are all taken has all its memory declared)."""
    if job.gpu_mem is not None:
        need = job.gpu_mem
        mem = [(r, i) for i, r in enumerate(free.mem) if r >= need and free.slices[i] > 0]
        return Assignment((min(mem)[1],), 0, need) if mem else None
    if job.slices:
        need = free.offer * job.slices // max(1, slices_per_gpu)
        candidates = [
            (room, free.mem[i], i)
            for i, room in enumerate(free.slices)
            if room >= job.slices and free.mem[i] >= need
        ]
        if not candidates:
            return None
        index = min(candidates)[2]  # best fit: the fullest GPU that still has room
        return Assignment((index,), job.slices)
    whole = [
        i
        for i, room in enumerate(free.slices)
        if room == slices_per_gpu and free.mem[i] >= free.offer
    ]
    if len(whole) < job.gpus:
        return None
    return Assignment(tuple(whole[: job.gpus]), slices_per_gpu)


def user_usage(state: State, now: float, config: PolicyConfig) -> dict[str, float]:
    """Recent GPU-seconds per user: decayed history plus what running jobs used so far,
    decayed alike (:func:`run_usage`)."""
    totals = {user: u.decayed(now, config.half_life) for user, u in state.usage.items()}
    for job in state.running:
        share = gpu_share(job.assignment, config.slices_per_gpu, offer(state, config))
        used = run_usage(share, now - job.started_at, config.half_life)
        totals[job.user] = totals.get(job.user, 0.0) + used
    return totals


def user_standings(state: State, now: float, config: PolicyConfig) -> dict[str, Standing]:
    """Every user with jobs queued or running: recent GPU-seconds, share, and standing."""
    users = [j.user for j in state.queued] + [j.user for j in state.running]
    shares = effective_shares(users, config.user_shares, config.group_shares, config.user_groups)
    return standings(user_usage(state, now, config), shares)


def waiting_since(state: State) -> dict[str, float]:
    """Per user, the last time one of their jobs started or ended (a job's wait counts
    from then, or from its submission, whichever is later)."""
    last = {user: usage.at for user, usage in state.usage.items()}
    for job in state.running:
        last[job.user] = max(last.get(job.user, -math.inf), job.started_at)
    return last


def held_job(state: State, now: float, config: PolicyConfig) -> tuple[Pending, float] | None:
    """The job that has waited longest without its user getting GPU time, once that is
    over ``starvation_after``, and when its wait began; ``None`` if no job has waited so."""
    last = waiting_since(state)
    running_count = _running_count(state.running)
    cap = config.max_running_per_user
    best: tuple[float, float, int, Pending] | None = None
    for job in state.queued:
        if never_runs(job, state, config):
            continue
        if cap and running_count.get(job.user, 0) >= cap:
            continue  # it waits for its own user's jobs, not for anyone else's
        since = max(job.submitted_at, last.get(job.user, -math.inf))
        if now - since >= config.starvation_after:
            key = (since, job.submitted_at, job.id, job)
            if best is None or key[:3] < best[:3]:
                best = key
    return None if best is None else (best[3], best[0])


def _running_count(running: Iterable[Active]) -> dict[str, int]:
    count: dict[str, int] = {}
    for active in running:
        count[active.user] = count.get(active.user, 0) + 1
    return count


def order_queue(state: State, now: float, config: PolicyConfig) -> list[Pending]:
    """The queue in the order jobs will be considered: the held job, then fair share."""
    return _order_queue(state, now, config, held_job(state, now, config))


def _order_queue(
    state: State, now: float, config: PolicyConfig, held: tuple[Pending, float] | None
) -> list[Pending]:
    standing = user_standings(state, now, config)
    per_user: dict[str, deque[Pending]] = {}
    for job in sorted(state.queued, key=lambda j: (j.submitted_at, j.id)):
        per_user.setdefault(job.user, deque()).append(job)
    ordered: list[Pending] = []
    if held is not None:
        # First, and FIFO within its user: only requests that can never run were before it.
        mine = per_user[held[0].user]
        while ordered[-1:] != [held[0]]:
            ordered.append(mine.popleft())
        if not mine:
            del per_user[held[0].user]
    # Interleave users: repeatedly take the head job of the user who is owed most,
    # counting each job already placed ahead as if it ran (so one user's five jobs
    # do not all go before another user's one).
    placed_count = _running_count(state.running)
    while len(per_user) > 1:
        user = min(
            per_user,
            key=lambda u: (standing[u].key, placed_count.get(u, 0), per_user[u][0].submitted_at),
        )
        job = per_user[user].popleft()
        ordered.append(job)
        placed_count[user] = placed_count.get(user, 0) + 1
        if not per_user[user]:
            del per_user[user]
    for rest in per_user.values():  # one user left: their jobs in their own order
        ordered.extend(rest)
    return ordered


def decide(state: State, now: float, config: PolicyConfig) -> list[Grant]:
    """The jobs to start now, and where."""
    return plan(state, now, config).grants


@dataclass
class Plan:
    """One pass's decision: the grants, why the others wait, and the held job's reservation."""

    grants: list[Grant] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)
    held: tuple[Pending, float] | None = None  # the held job and when its wait began
    reserved_at: float | None = None  # when the held job that does not fit will


def _reserve(
    job: Pending, free: Room, ends: Iterable[tuple[float, Assignment]], spg: int
) -> tuple[float, Room]:
    """The earliest time ``job`` fits if every running job uses its whole time limit, and
    the room free then (before anything else is started)."""
    room = free.copy()
    for end, assignment in sorted(ends, key=lambda e: (e[0], e[1].gpus)):
        room.take(assignment, spg, -1)
        if fit(job, room, spg) is not None:
            return end, room
    raise AssertionError("a job that fits the machine fits once every running job ends")


def fair_parts(state: State, config: PolicyConfig, held: Mapping[str, float]) -> dict[str, float]:
    """Each waiting user's part of the machine, in GPU-equivalents: the GPUs not held by
    users with nothing waiting, split among the users who wait by their shares."""
    cap = config.max_running_per_user
    count = _running_count(state.running)
    waiting = {
        job.user
        for job in state.queued
        if not never_runs(job, state, config) and not (cap and count.get(job.user, 0) >= cap)
    }
    shares = effective_shares(waiting, config.user_shares, config.group_shares, config.user_groups)
    rest = state.gpu_count - sum(g for user, g in held.items() if user not in waiting)
    total = sum(shares.values())
    return {user: rest * shares[user] / total for user in waiting} if total > 0 else {}


def held_gpus(state: State, config: PolicyConfig) -> dict[str, float]:
    """GPU-equivalents each user's running jobs hold now."""
    held: dict[str, float] = {}
    for job in state.running:
        share = gpu_share(job.assignment, config.slices_per_gpu, offer(state, config))
        held[job.user] = held.get(job.user, 0.0) + share
    return held


def plan(state: State, now: float, config: PolicyConfig) -> Plan:
    """One pass, repeated on the state it leaves until nothing more starts (a start can
    move who is under their part), so a second call at the same ``now`` starts nothing."""
    result = _plan_once(state, now, config)
    grants: list[Grant] = []
    started_held: Plan | None = None
    while result.grants:
        grants += result.grants
        if result.held is not None and result.held[0].id in {g.job_id for g in result.grants}:
            started_held = result
        by_id = {job.id: job for job in state.queued}
        state = replace(
            state,
            queued=tuple(j for j in state.queued if j.id not in {g.job_id for g in grants}),
            running=(
                *state.running,
                *(
                    Active(
                        g.job_id,
                        by_id[g.job_id].user,
                        g.assignment,
                        now,
                        by_id[g.job_id].time_limit,
                    )
                    for g in result.grants
                ),
            ),
        )
        result = _plan_once(state, now, config)
    result.grants = grants
    if started_held is not None:  # the held job started: say so, with its reservation
        result.held, result.reserved_at = started_held.held, started_held.reserved_at
    return result


def _plan_once(state: State, now: float, config: PolicyConfig) -> Plan:
    spg = config.slices_per_gpu
    free = free_room(state, config)
    running_count = _running_count(state.running)
    result = Plan(held=held_job(state, now, config))
    held = held_gpus(state, config)
    parts = fair_parts(state, config, held)
    ordered = _order_queue(state, now, config, result.held)
    # Users under their part of the machine go first, and over-share users start nothing
    # while one of them still waits: without preemption, letting the heavy user backfill
    # what a light user's job could not use yet gives the heavy user most of each hour.
    first = [
        job
        for job in ordered
        if held.get(job.user, 0.0) < parts.get(job.user, 0.0) - 1e-9
        or (result.held is not None and job.id == result.held[0].id)
    ]
    first_ids = {job.id for job in first}
    later = [job for job in ordered if job.id not in first_ids]
    # The held job's reservation, else the first under-share job that does not fit (the
    # machine drains towards it): its time, the room then, and the job.
    reservation: tuple[float, Room, Pending] | None = None
    ends = [(a.started_at + a.time_limit, a.assignment) for a in state.running]
    cap = config.max_running_per_user
    reached: set[int] = set()  # jobs of users who reached their part in this pass
    for job in first:
        if held.get(job.user, 0.0) >= parts.get(job.user, 0.0) - 1e-9 and not (
            result.held is not None and job.id == result.held[0].id
        ):
            reached.add(job.id)  # the part counts each start, not once per pass
            continue
        if never_runs(job, state, config):
            result.reasons[job.id] = "never_fits"
            continue
        if cap and running_count.get(job.user, 0) >= cap:
            result.reasons[job.id] = "user_cap"
            continue
        assignment = fit(job, free, spg)
        if assignment is None:
            result.reasons[job.id] = "resources"
            if reservation is None:
                # What frees up first is reserved for it, and nothing still running then
                # may take that room (EASY backfill).
                limits = {j.id: j.time_limit for j in state.queued}
                started = [(now + limits[g.job_id], g.assignment) for g in result.grants]
                at, room = _reserve(job, free, ends + started, spg)
                reservation = (at, room, job)
                if result.held is not None and job.id == result.held[0].id:
                    result.reserved_at = at
                    result.reasons[job.id] = "held"
            continue
        if reservation is not None and now + job.time_limit > reservation[0]:
            # Backfill: it would still run at the reservation; only if it leaves room.
            room = reservation[1].copy()
            room.take(assignment, spg)
            if room.overdrawn() or fit(reservation[2], room, spg) is None:
                held_first = result.held is not None and reservation[2].id == result.held[0].id
                result.reasons[job.id] = "reserved" if held_first else "draining"
                continue
            reservation = (reservation[0], room, reservation[2])
        free.take(assignment, spg)
        running_count[job.user] = running_count.get(job.user, 0) + 1
        result.grants.append(Grant(job.id, assignment))
        held[job.user] = held.get(job.user, 0.0) + gpu_share(assignment, spg, free.offer)
    waits = ("resources", "held", "reserved", "draining")
    blocked = any(result.reasons.get(job.id) in waits for job in first)
    if reached:
        later = [job for job in ordered if job.id in reached or job.id not in first_ids]
    for job in later:
        if never_runs(job, state, config):
            result.reasons[job.id] = "never_fits"
        elif cap and running_count.get(job.user, 0) >= cap:
            result.reasons[job.id] = "user_cap"
        elif not any(free.slices) or (assignment := fit(job, free, spg)) is None:
            result.reasons[job.id] = "resources"  # (a full machine needs no fit per job)
        elif blocked:  # it fits, but the room is kept for the users under their part
            result.reasons[job.id] = "over_share"
        else:
            free.take(assignment, spg)
            running_count[job.user] = running_count.get(job.user, 0) + 1
            result.grants.append(Grant(job.id, assignment))
    return result


def explain(
    state: State, now: float, config: PolicyConfig, horizon: int = 500
) -> dict[int, Waiting]:
    """Position, reason, standing and estimated start for every queued job.

    The estimate replays the queue forward assuming every running job uses its
    whole time limit, so it is an upper bound unless higher-priority work
    arrives. Jobs beyond ``horizon`` places, or that can never run, get ``None``.
    """
    ordered = order_queue(state, now, config)
    decided = plan(state, now, config)
    standing = user_standings(state, now, config)
    etas = _replay(state, now, config, ordered[:horizon])
    if decided.reserved_at is not None and decided.held is not None:
        # The held job starts by its reservation whatever else happens meanwhile.
        job_id = decided.held[0].id
        etas[job_id] = min(etas.get(job_id, math.inf), decided.reserved_at)
    # Number jobs in the order the replay starts them, so a later position never
    # gets an earlier ETA (running jobs' growing usage can reorder users); jobs
    # with no estimate keep their priority order, last (the sort is stable).
    ordered.sort(key=lambda j: (j.id not in etas, etas.get(j.id, 0.0)))
    result: dict[int, Waiting] = {}
    users_ahead: list[str] = []
    for position, job in enumerate(ordered, start=1):
        reason = decided.reasons.get(job.id, "resources")
        mine = standing[job.user]
        other: Standing | None = None
        ahead = [standing[u] for u in users_ahead if u != job.user]
        if reason == "resources":
            lower = [s for s in ahead if s.key < mine.key]
            if lower:
                reason, other = "fair_share", min(lower, key=lambda s: (s.key, s.user))
            elif position > 1:
                reason = "priority"  # its own user's earlier jobs, or an equal standing
        if other is None and position == 1:
            behind = [standing[j.user] for j in ordered[1:] if j.user != job.user]
            other = behind[0] if behind else None
        held = decided.held if reason in ("held", "reserved") else None
        result[job.id] = Waiting(
            position,
            reason,
            etas.get(job.id),
            usage=mine.usage,
            share=mine.share,
            other_user=other.user if other else None,
            other_usage=other.usage if other else None,
            other_share=other.share if other else None,
            held_job=held[0].id if held else None,
            held_since=held[1] if held else None,
            held_until=decided.reserved_at if held else None,
        )
        if job.user not in users_ahead:
            users_ahead.append(job.user)
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
                share = gpu_share(j.assignment, config.slices_per_gpu, offer(state, config))
                used = run_usage(share, clock - j.started_at, config.half_life)
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
