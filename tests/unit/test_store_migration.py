"""A database made before the job's identity source was kept opens, and gains the column."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gpulane.broker.store import JobRecord, Store

# The jobs table as the first release made it (no source column).
_OLD_JOBS = """
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, uid INTEGER NOT NULL, user TEXT NOT NULL,
    name TEXT NOT NULL, gpus INTEGER NOT NULL, slices INTEGER NOT NULL,
    time_limit INTEGER NOT NULL, mem INTEGER, command TEXT NOT NULL, state TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '', submitted_at REAL NOT NULL, started_at REAL,
    ended_at REAL, exit_status INTEGER, client_pid INTEGER, client_start TEXT,
    cmd_pid INTEGER, cmd_start TEXT, assigned_gpus TEXT, assigned_slices INTEGER,
    ending_state TEXT, ending_at REAL
);
INSERT INTO jobs (uid, user, name, gpus, slices, time_limit, command, state, submitted_at)
VALUES (1001, 'alice', 'old', 1, 0, 60, '["true"]', 'queued', 1.0);
"""


def test_an_old_database_gains_the_source_column(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir(mode=0o700)
    path = folder / "broker.db"
    with sqlite3.connect(path) as db:
        db.executescript(_OLD_JOBS)
    store = Store(path)
    try:
        old = store.get(1)
        assert old is not None and old.user == "alice" and old.source == ""
        new = JobRecord(1002, "bob", "new", 1, 0, 60, None, ["true"], 2.0, source="hub")
        store.insert(new)
        again = store.get(new.id)
        assert again is not None and again.source == "hub"
    finally:
        store.close()
    Store(path).close()  # a second open finds the column there and adds nothing
