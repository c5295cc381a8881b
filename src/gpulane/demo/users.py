"""Demo accounts: make a Unix user (with a home a server can start in) when missing."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path


def ensure_user(name: str) -> None:
    """Create ``name`` if missing, and its home if an older account lacks one (needs root)."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
        entry = pwd.getpwnam(name)
    home = Path(entry.pw_dir)
    if not home.is_dir():
        home.mkdir(mode=0o700, parents=True)
        os.chown(home, entry.pw_uid, entry.pw_gid)
