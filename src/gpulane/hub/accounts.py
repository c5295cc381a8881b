"""Which hub users may become a Unix user: never root, never a system account.

Where a spawner starts a hub user's server as the Unix user of the same name
(``setpriv --reuid`` on Slurm, LocalProcessSpawner's setuid), the hub name is
only as trustworthy as its source: an identity provider may let users edit
``preferred_username``. Whatever the name, it must not land on root or on a
system account (a uid below login.defs' UID_MIN, 1000 by default).
"""

from __future__ import annotations

import pwd
import re
from pathlib import Path

LOGIN_DEFS = Path("/etc/login.defs")
DEFAULT_UID_MIN = 1000
_UID_MIN = re.compile(r"^\s*UID_MIN\s+(\d+)\s*$", re.MULTILINE)


class AccountRefused(ValueError):
    """The hub user names a Unix account that no hub user may become; one line."""


def uid_min(login_defs: Path = LOGIN_DEFS) -> int:
    """The first uid of an ordinary account (login.defs' UID_MIN, else 1000)."""
    try:
        found = _UID_MIN.search(login_defs.read_text(errors="replace"))
    except OSError:
        return DEFAULT_UID_MIN
    return int(found.group(1)) if found else DEFAULT_UID_MIN


def check_unix_account(name: str, login_defs: Path = LOGIN_DEFS) -> None:
    """Refuse ``name`` where it is root or a system account here; an unknown name passes
    (the spawner's own lookup then fails with its error)."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return
    least = uid_min(login_defs)
    if uid == 0 or uid < least:
        raise AccountRefused(
            f"hub user {name!r} is the system account with uid {uid} here; servers run only "
            f"as ordinary accounts (uid {least} or more): ask an admin"
        )
