"""The queue's explanation (positions, reasons, estimates), kept per state version.

A status or a new watch asks for it; replaying a long queue for each one would
block the loop that also reads heartbeats. So it is kept per state version and
recomputed when the state changed (at most once per ten times its cost: in
between, the last one is served and watchers get the fresh one soon after) or
when it is over a second old.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from gpulane.broker import policy
from gpulane.broker.store import JobRecord
from gpulane.jobs import JobState

# Reused while the state is unchanged, for at most this long, or 25 times its cost
# where that is longer (time alone reorders a queue slowly: decaying usage, jobs
# becoming overdue) ...
EXPLAIN_MAX_AGE = 1.0
# ... and never recomputed more often than this many times its own cost, so that a
# stream of changes spends at most a tenth of the loop replaying the queue.
EXPLAIN_COST_FACTOR = 10.0

Waiting = dict[int, policy.Waiting]


def loop_time() -> float:
    """The running loop's clock (a virtual one in the specs), else the monotonic clock."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


def policy_state(
    jobs: Iterable[JobRecord],
    gpu_count: int,
    usage: dict[str, policy.Usage],
    gpu_memory: int = 0,
) -> policy.State:
    """The policy's view of the queued and running jobs."""
    queued, running = [], []
    for job in jobs:
        if job.state is JobState.QUEUED:
            queued.append(
                policy.Pending(
                    job.id,
                    job.user,
                    job.gpus,
                    job.slices,
                    job.time_limit,
                    job.submitted_at,
                    job.gpu_mem,
                )
            )
        elif job.state is JobState.RUNNING and job.started_at is not None:
            assignment = policy.Assignment(
                tuple(job.assigned_gpus), job.assigned_slices or 0, job.gpu_mem
            )
            running.append(
                policy.Active(job.id, job.user, assignment, job.started_at, job.time_limit)
            )
    return policy.State(gpu_count, tuple(queued), tuple(running), usage, gpu_memory)


class QueueExplainer:
    """The last explanation and queue order, and the state version they belong to."""

    def __init__(self) -> None:
        # Bumped on every change of the queued or running jobs or of usage.
        self.version = 0
        self.cost = 0.0  # seconds the last replay took
        self._explained: tuple[int, float, Waiting] | None = None
        self._ordered: tuple[int, Waiting, list[JobRecord]] | None = None

    def changed(self) -> None:
        self.version += 1

    def explain(
        self,
        state: Callable[[], policy.State],
        now: float,
        config: policy.PolicyConfig,
        stale_served: Callable[[], None],
    ) -> Waiting:
        """Every queued job's explanation; ``stale_served`` is called when an older one is
        returned, so that watchers are sent the fresh one soon."""
        started = loop_time()
        cached = self._explained
        if cached is not None:
            version, at, waiting = cached
            age = started - at
            if version == self.version and age < max(EXPLAIN_MAX_AGE, 25 * self.cost):
                return waiting
            if version != self.version and age < EXPLAIN_COST_FACTOR * self.cost:
                stale_served()
                return waiting
        waiting = policy.explain(state(), now, config)
        self.cost = loop_time() - started
        self._explained = (self.version, started, waiting)
        return waiting

    def order(self, jobs: Iterable[JobRecord], waiting: Waiting) -> list[JobRecord]:
        """Queued jobs by position (jobs newer than the explanation last), kept per version."""
        cached = self._ordered
        if cached is not None and cached[0] == self.version and cached[1] is waiting:
            return cached[2]
        queue = sorted(
            (j for j in jobs if j.state is JobState.QUEUED),
            key=lambda j: (
                j.id not in waiting,
                waiting[j.id].position if j.id in waiting else j.id,
            ),
        )
        self._ordered = (self.version, waiting, queue)
        return queue
