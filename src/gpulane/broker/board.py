"""What the dashboard shows beyond ``gpulane status``: recent ended jobs and standings.

Ended jobs follow the broker's access rule (broker/access.py): a user sees their
own, an admin everyone's, since a job's reason can say what it ran into. Standings
(decayed GPU-hours and share per user) are public, as Slurm's ``sshare`` is, and as
the dashboard's "GPU time today" already is: they only say who has used how much.
"""

from __future__ import annotations

from typing import TypedDict

from gpulane.broker import access, views
from gpulane.broker.core import Broker
from gpulane.broker.explain import policy_state
from gpulane.broker.identity import Identity
from gpulane.broker.k8s_capacity import KubeInventory
from gpulane.broker.policy import user_usage
from gpulane.broker.shares import effective_shares

ENDED_WINDOW = 24 * 3600.0  # how far back the list reaches (the pruner may keep less)
ENDED_LIMIT = 20  # newest first; the answer stays small however many jobs a day ends


class EndedRow(TypedDict):
    id: int
    user: str
    name: str | None
    state: str
    ended_at: float | None
    exit_status: int | None
    reason: str


class StandingRow(TypedDict):
    user: str
    gpu_hours: float  # decayed with the broker's half-life, running jobs included
    share: float  # the user's weight among the users listed
    half_life: float  # seconds


def ended_jobs(broker: Broker, who: Identity, now: float) -> list[EndedRow]:
    """The newest jobs that ended in the last day that ``who`` may see, with why."""
    admin = access.is_admin(who, broker.config, broker.settings.admin_users)
    records = broker.store.ended_since(now - ENDED_WINDOW)
    visible = [r for r in records if admin or access.owns(who, r)]
    visible.sort(key=lambda r: r.ended_at or 0.0, reverse=True)
    rows: list[EndedRow] = []
    for record in visible[:ENDED_LIMIT]:
        reason = record.message or (
            views.exit_text(record.exit_status) if record.exit_status else ""
        )
        rows.append(
            {
                "id": record.id,
                "user": record.user,
                "name": record.name,
                "state": record.state.value,
                "ended_at": record.ended_at,
                "exit_status": record.exit_status,
                "reason": reason or record.state.value,
            }
        )
    return rows


def capacity_warning(broker: Broker) -> str | None:
    """The one line on the GPUs' capacity an admin must act on (Kubernetes: nodes vs.
    time-slicing, see k8s_capacity.slicing_mismatch); None where there is none."""
    inventory = broker.inventory
    return inventory.notice if isinstance(inventory, KubeInventory) else None


def standings(broker: Broker, now: float) -> list[StandingRow]:
    """Every user with decayed use or a job now, most recent use first."""
    config = broker.config
    state = policy_state(
        broker.jobs.values(), broker.inventory.count, broker.usage, broker.inventory.memory
    )
    usage = user_usage(state, now, config)
    active = {j.user for j in state.queued} | {j.user for j in state.running}
    # Use decays without end: a user whose use has faded below a GPU-second drops off.
    users = {u for u, seconds in usage.items() if seconds >= 1.0} | active
    shares = effective_shares(users, config.user_shares, config.group_shares, config.user_groups)
    total = sum(shares.values()) or 1.0
    rows: list[StandingRow] = [
        {
            "user": user,
            "gpu_hours": usage.get(user, 0.0) / 3600,
            "share": shares[user] / total,
            "half_life": config.half_life,
        }
        for user in users
    ]
    rows.sort(key=lambda r: (-r["gpu_hours"], r["user"]))
    return rows
