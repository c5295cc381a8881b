"""Who is asking: identity from something a client cannot forge.

The first source is the Unix socket's peer credentials (SO_PEERCRED): the
kernel fills them in, so a client cannot claim another uid. The second is a
JupyterHub API token checked against the hub (:mod:`gpulane.broker.hub_auth`),
which names a hub user while the peer's uid and pid stay those of the socket.
A job keeps the source and uid it was submitted with, and only a caller with
both may act on it as its owner.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import struct
import time
from dataclasses import dataclass

# The uid of a hub login that has no Unix process behind it (the dashboard in a
# browser): no process has it, so it never matches a job's client.
NO_UID = -1

# Group changes (usermod -a -G) count within this many seconds.
GROUP_CACHE_SECONDS = 5.0
_group_cache: dict[int, tuple[float, str, frozenset[str]]] = {}


@dataclass(frozen=True)
class Identity:
    uid: int
    user: str
    groups: frozenset[str]
    pid: int | None  # the client's process, where the broker can see it
    source: str = "peercred"  # or "hub": a JupyterHub token checked against the hub
    admin: bool | None = None  # None: decided by uid 0 and the admin groups


def user_and_groups(uid: int) -> tuple[str, frozenset[str]]:
    """The login name and group names of ``uid``, cached briefly (GROUP_CACHE_SECONDS)."""
    cached = _group_cache.get(uid)
    now = time.monotonic()
    if cached and now - cached[0] < GROUP_CACHE_SECONDS:
        return cached[1], cached[2]
    try:
        entry = pwd.getpwuid(uid)
        name = entry.pw_name
        gids = set(_group_ids(name, entry.pw_gid))
    except KeyError:
        name, gids = f"uid{uid}", set()
    groups = set()
    for gid in gids:
        try:
            groups.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            groups.add(str(gid))
    result = frozenset(groups)
    _group_cache[uid] = (now, name, result)
    return name, result


def forget_groups(uid: int, name: str = "") -> None:
    """Read these groups afresh next time (after a refusal: ``usermod -a -G`` counts at once)."""
    _group_cache.pop(uid, None)
    if name:
        with contextlib.suppress(KeyError):
            _group_cache.pop(pwd.getpwnam(name).pw_uid, None)


def unix_groups_of_name(name: str) -> frozenset[str]:
    """The Unix groups of the account ``name`` (none where there is no such account)."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return frozenset()
    found, groups = user_and_groups(uid)
    return groups if found == name else frozenset()


def _group_ids(name: str, gid: int) -> list[int]:
    try:
        return os.getgrouplist(name, gid)
    except OSError:
        return [gid]


def peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """The pid and uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid, uid


def peer_identity(pid: int, uid: int) -> Identity:
    """Identity of a peer from its credentials, as :func:`peer_credentials` read them."""
    user, groups = user_and_groups(uid)
    return Identity(uid=uid, user=user, groups=groups, pid=pid or None)
