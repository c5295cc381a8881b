"""Fair-share standing: each user's share of the machine and recent use, as pure functions.

A user's *share* is a weight an admin sets (``user_shares``, default 1). A
group with a share (``group_shares``) has it split among its members who have
jobs queued or running, in proportion to their own weights; a user outside
every share group stands alone with their own weight. The fair-share order
compares *standing*: recent GPU-seconds (decayed with the half-life) divided by
the share, so a user with twice the share may use twice as much.

Share groups are groups of the broker's group source (:mod:`gpulane.broker.groups`):
Unix groups, read once when the broker starts (:func:`share_groups`), or the hub's,
learned from the groups a user comes with (:func:`share_group`, kept per user by
:func:`with_share_group`: one entry per hub user who submitted, a bound the hub's
admins set).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Standing:
    """One user's recent GPU-seconds, share, and the two divided (lower goes first)."""

    user: str
    usage: float
    share: float

    @property
    def key(self) -> float:
        return self.usage / self.share


def effective_shares(
    users: Iterable[str],
    user_shares: Mapping[str, float],
    group_shares: Mapping[str, float],
    user_groups: Mapping[str, str],
) -> dict[str, float]:
    """Each of ``users``' share; a group's share is split among the ``users`` in it."""
    active = sorted(set(users))
    members: dict[str, float] = {}  # group -> the sum of its active members' weights
    for user in active:
        group = user_groups.get(user, "")
        if group in group_shares:
            members[group] = members.get(group, 0.0) + user_shares.get(user, 1.0)
    shares: dict[str, float] = {}
    for user in active:
        weight = user_shares.get(user, 1.0)
        group = user_groups.get(user, "")
        if group in group_shares and members[group] > 0:
            shares[user] = group_shares[group] * weight / members[group]
        else:
            shares[user] = weight
    return shares


def standings(usage: Mapping[str, float], shares: Mapping[str, float]) -> dict[str, Standing]:
    """Every user with a share, standing by their recent use."""
    return {u: Standing(u, usage.get(u, 0.0), max(s, 1e-9)) for u, s in shares.items()}


def parse_shares(text: str, option: str) -> dict[str, float]:
    """``alice=2, bob=0.5`` (as an option is typed) as names and positive weights."""
    from gpulane.errors import OptionError

    result: dict[str, float] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not name.strip() or not 0 < weight <= 1e6:
            raise OptionError(
                f"{option} {item.strip()!r} is not NAME=WEIGHT; use names and positive "
                "weights separated by commas, such as alice=2,bob=1"
            )
        result[name.strip()] = weight
    return result


def share_group(groups: Iterable[str], group_shares: Mapping[str, float]) -> str | None:
    """The share group of a user in ``groups``: the first of ``group_shares`` (by name)
    among them, as :func:`share_groups` picks; ``None`` where they are in none."""
    mine = set(groups)
    return next((name for name in sorted(group_shares) if name in mine), None)


def with_share_group(
    user_groups: Mapping[str, str], user: str, group: str | None
) -> dict[str, str] | None:
    """``user_groups`` with ``user`` in ``group`` (out of every group for ``None``), or
    ``None`` where that changes nothing."""
    if user_groups.get(user) == group:
        return None
    result = {name: g for name, g in user_groups.items() if name != user}
    if group is not None:
        result[user] = group
    return result


def share_groups(group_shares: Mapping[str, float]) -> dict[str, str]:
    """Each user's share group, read from the system's groups when the broker starts: the
    first of ``group_shares`` (by name) that lists them or is their primary group."""
    import grp
    import pwd

    result: dict[str, str] = {}
    for name in sorted(group_shares):
        try:
            group = grp.getgrnam(name)
        except KeyError:
            continue
        members = set(group.gr_mem)
        members.update(p.pw_name for p in pwd.getpwall() if p.pw_gid == group.gr_gid)
        for user in members:
            result.setdefault(user, name)
    return result
