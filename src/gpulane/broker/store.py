"""The broker's durable state in SQLite (WAL): every change is committed before it is announced.

``kill -9`` of the broker loses nothing: on start it reloads queued and running
jobs and the users' decayed usage from here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sqlite3
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gpulane.errors import ConfigError, StateFolderFull
from gpulane.jobs import JobState

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    uid INTEGER NOT NULL,
    user TEXT NOT NULL,
    name TEXT NOT NULL,
    gpus INTEGER NOT NULL,
    slices INTEGER NOT NULL,
    time_limit INTEGER NOT NULL,
    mem INTEGER,
    command TEXT NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    submitted_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    exit_status INTEGER,
    client_pid INTEGER,
    client_start TEXT,
    cmd_pid INTEGER,
    cmd_start TEXT,
    assigned_gpus TEXT,
    assigned_slices INTEGER,
    ending_state TEXT,
    ending_at REAL,
    source TEXT NOT NULL DEFAULT '',
    detached INTEGER NOT NULL DEFAULT 0,
    ended_before_revoke INTEGER NOT NULL DEFAULT 0,
    gpu_mem INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_active ON jobs(state) WHERE state IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS jobs_ended ON jobs(ended_at) WHERE ended_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_ended_by_user ON jobs(user, id) WHERE ended_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS usage (
    user TEXT PRIMARY KEY,
    value REAL NOT NULL,
    at REAL NOT NULL
);
"""

# Columns added after the first release, with their definitions: a database made before
# gains them on open (ALTER TABLE ... ADD COLUMN), its rows taking the default.
_ADDED_COLUMNS = {
    "source": "TEXT NOT NULL DEFAULT ''",
    "detached": "INTEGER NOT NULL DEFAULT 0",
    "ended_before_revoke": "INTEGER NOT NULL DEFAULT 0",
    "gpu_mem": "INTEGER",
}

log = logging.getLogger("gpulane.broker")


def _is_full(error: BaseException) -> bool:
    """Whether ``error`` says the disk (or the file system's quota) has no room left."""
    if isinstance(error, sqlite3.OperationalError):
        code = getattr(error, "sqlite_errorcode", None)
        return code == sqlite3.SQLITE_FULL or "database or disk is full" in str(error)
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass
class JobRecord:
    """One job as the broker keeps it (mutable: the broker updates it and saves it here)."""

    uid: int
    user: str
    name: str
    gpus: int
    slices: int
    time_limit: int
    mem: int | None
    command: list[str]
    submitted_at: float
    state: JobState = JobState.QUEUED
    message: str = ""
    started_at: float | None = None
    ended_at: float | None = None
    exit_status: int | None = None
    client_pid: int | None = None
    client_start: str | None = None
    cmd_pid: int | None = None
    cmd_start: str | None = None
    assigned_gpus: list[int] = field(default_factory=list)
    assigned_slices: int | None = None
    ending_state: JobState | None = None  # set while a revoked job is being stopped
    ending_at: float | None = None
    # Where the submitter's identity came from ("peercred" or "hub"); '' for a job saved
    # before this was kept, which then answers to its uid from either source.
    source: str = ""
    detached: bool = False  # the lease passes to the command when the client goes
    # Its command had ended by itself when a revoke (cancel, time limit) reached it: a
    # success its client then reports stays a success. Stored, so a restart keeps it.
    ended_before_revoke: bool = False
    gpu_mem: int | None = None  # bytes of one GPU asked with --gpu-mem (then slices is 0)
    id: int = 0


_COLUMNS = [f.name for f in fields(JobRecord) if f.name != "id"]


def _to_row(record: JobRecord) -> list[Any]:
    row: list[Any] = []
    for name in _COLUMNS:
        value = getattr(record, name)
        if name in ("command", "assigned_gpus"):
            value = json.dumps(value)
        elif isinstance(value, JobState):
            value = value.value
        row.append(value)
    return row


def _from_row(row: sqlite3.Row) -> JobRecord:
    data = dict(row)
    data["command"] = json.loads(data["command"])
    data["assigned_gpus"] = json.loads(data["assigned_gpus"] or "[]")
    data["state"] = JobState(data["state"])
    data["detached"] = bool(data["detached"])
    data["ended_before_revoke"] = bool(data["ended_before_revoke"])
    data["ending_state"] = JobState(data["ending_state"]) if data["ending_state"] else None
    return JobRecord(**data)


# The WAL is cut back to this after a checkpoint (every ~4 MiB of writes): it never keeps
# the high-water mark of a burst.
WAL_SIZE_LIMIT = 8 * 1024 * 1024


def prepare_state_dir(folder: Path) -> None:
    """Make the state folder ours alone (0700), refusing one another user owns.

    The database holds every user's command lines; a folder another user owns could be
    read, or its files swapped, by them.
    """
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise ConfigError(f"state folder {folder} is not a folder owned by us; refusing")
    if info.st_mode & 0o077:
        folder.chmod(0o700)


class Store:
    def __init__(self, path: Path) -> None:
        prepare_state_dir(path.parent)
        self.folder = path.parent
        self.full = False  # the last write found no room (logged once, until one lands)
        # SQLite creates the -wal and -shm files with the database's mode; the umask makes
        # all three private from the moment they exist (a chmod afterwards leaves a window).
        # Process-wide, so only here, before the broker serves anyone.
        old_umask = os.umask(0o077)
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable against a process crash (kill -9); only a power cut may lose
            # the last transactions, which the clients' reconnects then resubmit or report.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            self._db.executescript(_SCHEMA)
            self._add_missing_columns()
        finally:
            os.umask(old_umask)
        # Files from an older broker, made before the umask was set, are closed too.
        for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
            with contextlib.suppress(FileNotFoundError):
                (path.parent / name).chmod(0o600)

    def _add_missing_columns(self) -> None:
        present = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, definition in _ADDED_COLUMNS.items():
            if name not in present:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """One write (or transaction): a full disk becomes :class:`StateFolderFull`, logged once."""
        try:
            yield
        except (sqlite3.OperationalError, OSError) as error:
            if not _is_full(error):
                raise
            if not self.full:
                log.warning(
                    "the state folder %s is full: writes are refused until there is room",
                    self.folder,
                )
            self.full = True
            raise StateFolderFull(f"the broker's state folder is full ({self.folder})") from error
        if self.full and not self._db.in_transaction:
            log.info("the state folder %s has room again", self.folder)
            self.full = False

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Saves inside commit together, or not at all."""
        with self._writing():
            self._db.execute("BEGIN")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (a full disk can do that).
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def insert(self, record: JobRecord) -> int:
        placeholders = ", ".join("?" for _ in _COLUMNS)
        with self._writing():
            cursor = self._db.execute(
                f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({placeholders})",
                _to_row(record),
            )
        record.id = int(cursor.lastrowid or 0)
        return record.id

    def save(self, record: JobRecord) -> None:
        assignments = ", ".join(f"{name} = ?" for name in _COLUMNS)
        with self._writing():
            self._db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ?", [*_to_row(record), record.id]
            )

    def active(self) -> list[JobRecord]:
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE state IN ('queued', 'running') ORDER BY id"
        ).fetchall()
        return [_from_row(row) for row in rows]

    def get(self, job_id: int) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _from_row(row) if row else None

    def ended_since(self, since: float) -> list[JobRecord]:
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE ended_at >= ? ORDER BY ended_at", (since,)
        ).fetchall()
        return [_from_row(row) for row in rows]

    def finished_per_user(self) -> dict[str, int]:
        """How many ended jobs the store keeps for each user."""
        rows = self._db.execute(
            "SELECT user, COUNT(*) AS n FROM jobs WHERE ended_at IS NOT NULL GROUP BY user"
        ).fetchall()
        return {row["user"]: int(row["n"]) for row in rows}

    def prune_ended_before(self, before: float, limit: int) -> list[str]:
        """Delete up to ``limit`` jobs that ended before ``before``, oldest first; their users."""
        with self._writing():
            rows = self._db.execute(
                "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE ended_at < ? "
                "ORDER BY ended_at LIMIT ?) RETURNING user",
                (before, limit),
            ).fetchall()
        return [row["user"] for row in rows]

    def prune_oldest_of(self, user: str, count: int) -> int:
        """Delete ``user``'s ``count`` oldest ended jobs; how many went."""
        with self._writing():
            rows = self._db.execute(
                "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE user = ? "
                "AND ended_at IS NOT NULL ORDER BY id LIMIT ?) RETURNING id",
                (user, count),
            ).fetchall()
        return len(rows)

    def usage(self) -> dict[str, tuple[float, float]]:
        rows = self._db.execute("SELECT user, value, at FROM usage").fetchall()
        return {row["user"]: (row["value"], row["at"]) for row in rows}

    def save_usage(self, user: str, value: float, at: float) -> None:
        with self._writing():
            self._db.execute(
                "INSERT INTO usage (user, value, at) VALUES (?, ?, ?) "
                "ON CONFLICT(user) DO UPDATE SET value = excluded.value, at = excluded.at",
                (user, value, at),
            )

    def close(self) -> None:
        self._db.close()
