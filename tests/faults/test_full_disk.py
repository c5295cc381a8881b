"""A full state folder (issue 11, 4): clear refusals, no half-state, no dead background task.

The broker's state folder is a 2 MiB tmpfs, filled with a file until ENOSPC while a job runs
and another waits. Every write must then either land or leave the state as it was, saying
the folder is full; a finish is retried until there is room again; and once the file is gone
a change that could not be saved is saved later and the database is intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import BrokerProcess
from tests.support.users import need, wait_for

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE, BOB, CAROL = "gpl-alice", "gpl-bob", "gpl-carol"
TTL = 3.0


@pytest.fixture
def tmpfs_broker() -> Iterator[BrokerProcess]:
    need(os.geteuid() == 0, "mounting a tmpfs needs root")
    folder = Path(tempfile.mkdtemp(prefix="gpulane-full-"))
    folder.chmod(0o755)  # other users must reach the socket inside
    state = folder / "state"
    state.mkdir(mode=0o700)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(state)], check=True
    )
    broker = BrokerProcess(folder, ["--simulate-gpus", "1", "--lease-ttl", f"{TTL:g}s"])
    try:
        broker.start()
        yield broker
    finally:
        broker.reap_clients()
        broker.stop()
        subprocess.run(["umount", str(state)], check=False)
        shutil.rmtree(folder, ignore_errors=True)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until the file system has no room left."""
    block = bytes(4096)
    with open(path, "wb", buffering=0) as out:
        while True:
            try:
                out.write(block)
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
                break
    # Fill the last partial block too, down to single bytes.
    with open(path, "ab", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0")


def status(broker: BrokerProcess) -> dict:
    result = broker.call(None, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def row(database: Path, job_id: int) -> sqlite3.Row:
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.row_factory = sqlite3.Row
        found = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert found is not None, f"no row for job {job_id}"
    return found


def test_a_full_state_folder_refuses_clearly_and_loses_nothing(tmpfs_broker):
    broker = tmpfs_broker
    state = broker.folder / "state"
    database = state / "broker.sqlite3"
    go = broker.folder / "go"
    holder = broker.spawn(
        ALICE, "run", "--name", "hold", "--", "sh", "-c", f"until [ -e {go} ]; do sleep 0.05; done"
    )
    wait_for(lambda: [j["name"] for j in status(broker)["running"]] == ["hold"], what="the grant")
    waiter = broker.spawn(BOB, "run", "--name", "wait", "--", "true")
    wait_for(lambda: [j["name"] for j in status(broker)["queue"]] == ["wait"], what="a queued job")
    hold_id = status(broker)["running"][0]["id"]
    wait_id = status(broker)["queue"][0]["id"]

    filler = state / "filler"
    fill(filler)
    full = f"the broker's state folder is full ({state})"

    # A submit is refused with one line naming the folder, not a 500.
    submit = broker.call(CAROL, "run", "--", "true")
    assert submit.returncode != 0
    assert full in submit.stderr, submit.stderr
    assert "Internal Server Error" not in submit.stderr

    # A cancel that cannot be saved is refused, and the job stays queued.
    cancel = broker.call(BOB, "cancel", str(wait_id))
    assert cancel.returncode != 0
    assert full in cancel.stderr, cancel.stderr
    snap = status(broker)
    assert [j["id"] for j in snap["queue"]] == [wait_id], json.dumps(snap)

    # Reads keep working (status above); the command ends well, but its end cannot be saved:
    # the client keeps retrying and the job stays running, not failed.
    go.touch()
    # Bob's client dies while the folder is full: its pidfd fires once, the end cannot be
    # saved then, and must be saved later, not forgotten.
    waiter.send_signal(signal.SIGKILL)
    waiter.wait()
    time.sleep(TTL + 2)
    assert holder.poll() is None, holder.communicate()
    assert [j["id"] for j in status(broker)["running"]] == [hold_id]
    assert row(database, hold_id)["state"] == "running"
    snap = status(broker)
    assert [j["id"] for j in snap["queue"]] == [wait_id], json.dumps(snap)

    filler.unlink()
    # The finish lands as it was: completed, exit 0.
    _, err = holder.communicate(timeout=30)
    assert holder.returncode == 0, err
    wait_for(lambda: row(database, hold_id)["state"] == "completed", what="the finish to land")
    assert row(database, hold_id)["exit_status"] == 0
    # The dead client's job ends as what happened to it, not as a lease that ran out later.
    wait_for(
        lambda: row(database, wait_id)["state"] in ("cancelled", "failed"),
        timeout=2 * TTL + 5,
        what="the dead client's job to end",
    )
    assert "exited" in row(database, wait_id)["message"], row(database, wait_id)["message"]

    # Writes work again, and the database is intact.
    again = broker.call(CAROL, "run", "--", "true")
    assert again.returncode == 0, again.stderr
    broker.stop()
    with contextlib.closing(sqlite3.connect(database)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert "Traceback" not in broker.log_text()
