"""Where clients find the scheduler: one place for defaults and environment variables."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_SOCKET = Path("/run/gpulane/broker.sock")
SOCKET_ENV = "GPULANE_SOCKET"


def socket_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The broker's socket: the explicit path, else ``$GPULANE_SOCKET``, else the default."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(SOCKET_ENV)
    return Path(from_env) if from_env else DEFAULT_SOCKET


def default_state_dir() -> Path:
    """Where the broker keeps its database: /var/lib/gpulane as root, else the user's state dir."""
    if os.geteuid() == 0:
        return Path("/var/lib/gpulane")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gpulane"
