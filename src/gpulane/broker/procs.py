"""Facts about processes read from /proc, used to tell a live process from a reused PID."""

from __future__ import annotations

import os
import signal


def start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or ``None`` if it is gone.

    A PID plus its start time names one process for good: PIDs are reused, start times
    of a reused PID differ.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else None


def owner_uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def leads_group(pid: int, uid: int) -> bool:
    """True if ``pid`` leads its own process group and belongs to ``uid``: a group we may signal."""
    try:
        return owner_uid(pid) == uid and os.getpgid(pid) == pid
    except OSError:
        return False


def is_alive(pid: int | None, started: str | None) -> bool:
    """True if the process ``pid`` that started at ``started`` still runs (zombies count as gone)."""
    if not pid or pid <= 0:
        return False
    now_started = start_time(pid)
    if now_started is None or (started is not None and now_started != started):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
        return data[data.rfind(b")") + 2 :].split()[0] != b"Z"
    except OSError:
        return False


def signal_group(pgid: int, started: str | None, sig: signal.Signals) -> bool:
    """Send ``sig`` to the process group led by ``pgid`` if its leader is still the same process.

    Returns False where the group is gone or we may not signal it.
    """
    if not pgid or pgid <= 1 or not is_alive(pgid, started):
        return False
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True
