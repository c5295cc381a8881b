"""Whether the broker takes a submission into its queue: the checks before anything is saved.

Each refusal is one of :mod:`gpulane.errors`' kinds with one line for the person who
submitted; a refused request changes no state (only the refused user's cached groups
are forgotten, so an admin's fix counts on the next try). The per-minute submission
rate is :mod:`gpulane.broker.quotas`' (it counts accepted submissions).
"""

from __future__ import annotations

from collections.abc import Iterable

from gpulane.broker import policy
from gpulane.broker.gpus import Inventory
from gpulane.broker.groups import GroupReader
from gpulane.broker.identity import Identity, forget_groups
from gpulane.broker.settings import BrokerSettings
from gpulane.broker.store import JobRecord
from gpulane.errors import Forbidden, InvalidRequest, LimitReached
from gpulane.jobs import JobState, Request, format_duration


def admit(
    who: Identity,
    request: Request,
    *,
    admin: bool,
    settings: BrokerSettings,
    inventory: Inventory,
    groups: GroupReader,
    jobs: Iterable[JobRecord],
) -> int:
    """The time limit (seconds) ``request`` runs under, if ``who`` may queue it here.

    ``jobs`` are the broker's queued and running jobs. Raises ``Forbidden`` (not in a
    GPU group), ``InvalidRequest`` (over the time limit, or can never fit this machine)
    or ``LimitReached`` (too many queued jobs), checked in that order.
    """
    cfg = settings.policy
    if not policy.may_use_gpus(who.groups, cfg, admin):
        names = sorted(cfg.gpu_groups)
        where = "hub group" if groups.from_hub() else "group"
        forget_groups(who.uid, who.user)  # the admin's fix counts on the next try
        raise Forbidden(
            f"{who.user} may not use GPUs here: not in the GPU {where} "
            f"{' or '.join(names)}; {groups.how_to_add(who.user, names[0])}"
        )
    time_limit = request.time_limit or min(cfg.default_time, cfg.max_time)
    if time_limit > cfg.max_time:
        raise InvalidRequest(
            f"--time {format_duration(time_limit)} is over this broker's maximum "
            f"{format_duration(cfg.max_time)}; ask for less",
        )
    never = policy.never_runs(
        policy.Pending(0, who.user, request.gpus, request.slices, 0, 0.0, request.gpu_mem),
        policy.State(inventory.count, gpu_memory=inventory.memory),
        cfg,
    )
    if never:
        raise InvalidRequest(f"this request can never run here: it {never}")
    queued = sum(1 for j in jobs if j.user == who.user and j.state is JobState.QUEUED)
    if queued >= settings.max_queued_per_user:
        raise LimitReached(
            f"{who.user} already has {queued} queued jobs, the most allowed; wait or cancel some",
        )
    return time_limit
