"""Who may act on a job: its owner (the same name, source and uid), or an admin.

Pure functions of an :class:`~gpulane.broker.identity.Identity` and a job record;
the core turns a "no" into "no job N", so another user's jobs are unseen.
"""

from __future__ import annotations

from gpulane.broker import policy
from gpulane.broker.identity import NO_UID, Identity
from gpulane.broker.store import JobRecord


def is_admin(
    who: Identity, config: policy.PolicyConfig, admin_users: frozenset[str] = frozenset()
) -> bool:
    """One rule for both identities: the hub's word (its admin flag or custom:gpulane:admin),
    root over the socket, the broker's admin users by name (``--admin-users``), or an admin
    group (the groups read from one place, broker/groups.py)."""
    if who.admin or who.user in admin_users:
        return True
    uid = who.uid if who.admin is None else NO_UID  # root's uid counts over the socket only
    return policy.is_admin(uid, who.groups, config)


def owns(who: Identity, job: JobRecord, lease: bool = False) -> bool:
    """True if ``who`` is the job's owner: its name, from the source it was submitted
    with, and (for the lease's own calls, ``lease``) from the same uid.

    Names alone are not enough: a hub name and a Unix name may coincide, and hub users
    may share one Unix uid (so the name is checked, not only the uid).
    """
    if job.user != who.user or (job.source and job.source != who.source):
        return False
    if job.uid == who.uid:
        return True
    # A hub login without a process (the dashboard) may see and cancel its hub jobs,
    # never speak for their client.
    return not lease and who.source == "hub" and who.uid == NO_UID and who.pid is None
