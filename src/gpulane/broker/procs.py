"""Facts about processes read from /proc, used to tell a live process from a reused PID."""

from __future__ import annotations

import os
import signal


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat's fields from the state (field 3) on, or ``None`` if ``pid`` is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return data[data.rfind(b")") + 2 :].split()


def start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or ``None`` if it is gone.

    A PID plus its start time names one process for good: PIDs are reused, start times
    of a reused PID differ.
    """
    fields = _stat_fields(pid)
    return fields[19].decode() if fields is not None and len(fields) > 19 else None


def owner_uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


# How many parents :func:`descends_from` reads at most: a job's command is its client's
# child, or a few levels below it; a walk never runs unbounded on a crafted tree.
MAX_ANCESTRY = 32


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` from /proc/PID/stat (0 for the root of a namespace), or None."""
    fields = _stat_fields(pid)
    return int(fields[1]) if fields is not None and len(fields) > 1 else None


def descends_from(pid: int, ancestor: int, ancestor_start: str | None) -> bool:
    """True if ``pid`` is a proper descendant of ``ancestor``, the process that started at
    ``ancestor_start`` (so not a later process that reused its PID)."""
    if ancestor <= 1 or ancestor_start is None:
        return False
    current = pid
    for _ in range(MAX_ANCESTRY):
        parent = parent_pid(current)
        if parent is None or parent <= 0:
            return False
        if parent == ancestor:
            return start_time(ancestor) == ancestor_start
        current = parent
    return False


def is_command_of(pid: int, client_pid: int, client_start: str | None, uid: int | None) -> bool:
    """True if ``pid`` may be signalled as the command of a job whose client is ``client_pid``:
    it leads its own process group, descends from that client and, where ``uid`` is given
    (a client that is not root), belongs to it."""
    started = start_time(pid)
    if started is None or pid == client_pid:
        return False
    try:
        leads = os.getpgid(pid) == pid
    except OSError:
        return False
    if not leads or (uid is not None and owner_uid(pid) != uid):
        return False
    if not descends_from(pid, client_pid, client_start):
        return False
    return start_time(pid) == started  # still the process all of this was checked on


def is_alive(pid: int | None, started: str | None) -> bool:
    """True if the process ``pid`` that started at ``started`` still runs (zombies count as gone)."""
    if not pid or pid <= 0:
        return False
    now_started = start_time(pid)
    if now_started is None or (started is not None and now_started != started):
        return False
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != b"Z"


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


def open_device_files(inodes: set[tuple[int, int]]) -> list[tuple[int, str, int, tuple[int, int]]]:
    """Processes (not root's) holding a file of ``inodes`` open: (pid, start time, uid, inode).

    Matched by the file's (st_dev, st_ino), not its path or device number, so a second
    name for the same node is found and another node with the same numbers is not.
    """
    found: list[tuple[int, str, int, tuple[int, int]]] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        uid = owner_uid(pid)
        if not uid:  # root's (or gone)
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        held: set[tuple[int, int]] = set()
        for fd in fds:
            try:
                info = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (info.st_dev, info.st_ino) in inodes:
                held.add((info.st_dev, info.st_ino))
        started = start_time(pid) if held else None
        if started is not None:
            found.extend((pid, started, uid, key) for key in sorted(held))
    return found


def kill_process(pid: int, started: str) -> bool:
    """SIGKILL ``pid`` if it is still the process that started at ``started``."""
    if not is_alive(pid, started):
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True
