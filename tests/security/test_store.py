"""Findings 3 and 9: what one user can make the broker store, and who can read it.

A real root broker with its default limits; gpl-alice floods it with submit-and-cancel
cycles of the largest commands over raw HTTP (once: 178 MB in 14 s), and gpl-bob tries to
read every file of the broker's state (once: the WAL, 0644, held alice's command line).
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpulane.jobs import MAX_COMMAND_BYTES
from tests.security.raw_client import RawClient, one_line_error
from tests.support.users import as_user, user_env

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE, BOB = "gpl-alice", "gpl-bob"
KIB, MIB = 1024, 1024 * 1024
DEFAULT_SUBMITS_PER_MINUTE = 60


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_one_user_cannot_fill_the_disk(make_broker):
    broker = make_broker("--simulate-gpus", "1")
    state = broker.folder / "state"
    alice, bob = RawClient(ALICE, broker.socket), RawClient(BOB, broker.socket)
    try:
        base = folder_bytes(state)
        # A command as large as the old bound (128 KiB) is refused outright.
        status, answer = alice.request("POST", "/v1/jobs", {"command": ["x" * 120_000]})
        assert status == 400 and one_line_error(answer), (status, answer)
        assert "longer than" in answer["error"]
        # The largest command allowed, submitted and cancelled as fast as alice can.
        command = ["sh", "-c", "y" * (MAX_COMMAND_BYTES - 8)]
        started = time.monotonic()
        accepted = refused = 0
        for _ in range(400):
            status, answer = alice.request("POST", "/v1/jobs", {"command": command})
            if status == 429:
                assert one_line_error(answer), answer
                refused += 1
                if refused >= 50:
                    break
                continue
            assert status == 201, (status, answer)
            accepted += 1
            status, _ = alice.request("POST", f"/v1/jobs/{answer['id']}/cancel", {})
            assert status == 200
        elapsed = time.monotonic() - started
        assert refused >= 50, f"no rate limit: {accepted} submissions accepted"
        # A sliding minute: the first minute's allowance, plus what comes free as it slides.
        allowed = DEFAULT_SUBMITS_PER_MINUTE * (1 + int(elapsed // 60) + 1)
        assert accepted <= allowed, (accepted, elapsed)
        # Another user is not held back by alice's flood.
        status, answer = bob.request("POST", "/v1/jobs", {"command": ["true"]})
        assert status == 201, answer
        # Each accepted job: its command and a few columns, written twice to the WAL, whose
        # size is capped after every checkpoint (8 MiB) on top of a 4 MiB checkpoint interval.
        bound = base + 2 * MIB + accepted * (MAX_COMMAND_BYTES + 8 * KIB) + 12 * MIB
        assert folder_bytes(state) <= bound, (folder_bytes(state), bound, accepted)
    finally:
        alice.close()
        bob.close()
    assert "Traceback" not in broker.log_text()


def readable_by(user: str, paths: list[Path]) -> list[str]:
    """Which of ``paths`` ``user`` can open (files) or list (folders)."""
    code = (
        "import os, sys\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        os.listdir(p) if os.path.isdir(p) else open(p, 'rb').read(1)\n"
        "        print(p)\n"
        "    except OSError:\n"
        "        pass\n"
    )
    result = subprocess.run(
        as_user(user, [sys.executable, "-c", code, *map(str, paths)]),
        env=user_env(user, None),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_the_state_folder_is_private_from_the_first_start(make_broker):
    broker = make_broker("--simulate-gpus", "1")
    state = broker.folder / "state"
    alice = RawClient(ALICE, broker.socket)
    try:
        secret = "--password=hunter2-do-not-leak"
        status, job = alice.request("POST", "/v1/jobs", {"command": ["train", secret]})
        assert status == 201, job
        files = sorted(p for p in state.rglob("*"))
        assert any(p.name.endswith("-wal") for p in files), files  # the WAL holds the secret
        assert readable_by(BOB, [state, *files]) == []
        # Even if the folder were open, no file in it is.
        state.chmod(0o755)
        assert readable_by(BOB, files) == []
        assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o600"}
    finally:
        alice.close()
    # A folder left open (an older broker, an admin's mkdir) is closed on the next start.
    broker.stop()
    state.chmod(0o755)
    broker.start()
    assert state.stat().st_mode & 0o777 == 0o700
    # One that another user owns (who could read or swap the database) is refused.
    broker.stop()
    os.chown(state, pwd.getpwnam(BOB).pw_uid, -1)
    with pytest.raises(RuntimeError) as failed:
        broker.start()
    last = broker.log_text().strip().splitlines()[-1]
    assert last.startswith("gpulane: state folder") and "owned by us" in last, str(failed.value)
    assert "Traceback" not in broker.log_text()
