"""Spill folders (/dev/shm/gpulane-*) of a kernel killed with SIGKILL do not stay forever.

A kernel stages big arrays in a private folder in /dev/shm (memory: a leftover holds RAM
until reboot). A kernel killed with SIGKILL never runs its cleanup, so the next kernel
of the same user removes that user's folders whose creating process is gone; another
user's folders, and a live kernel's, are never touched.
"""

from __future__ import annotations

import os
import pwd
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.users import as_user, user_env

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE, BOB = "gpl-alice", "gpl-bob"

# A kernel's transfer: stage an 8 MiB array (out of band: a file in the folder), report, wait.
STAGE = r"""
import os, stat, sys, time
import numpy
from gpulane.kernel.transfer import default_spill_dir, pack
folder = default_spill_dir()
info = folder.stat()
packed = pack({"a": numpy.zeros(1 << 20)}, folder, 1 << 30)
assert packed.buffers["a"][0].path, "the array should be spilled to a file"
print(folder, oct(stat.S_IMODE(info.st_mode)), info.st_uid, flush=True)
time.sleep(60)  # killed long before
"""


def stage(user: str) -> tuple[subprocess.Popen[str], Path]:
    """A process of ``user`` that has staged a transfer and is still alive."""
    proc = subprocess.Popen(
        as_user(user, [sys.executable, "-c", STAGE]),
        env=user_env(user, None),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert len(line) == 3, proc.stderr.read() if proc.stderr else line
    folder, mode, uid = Path(line[0]), line[1], int(line[2])
    assert mode == "0o700", f"{folder} was created {mode}"  # private from the moment it exists
    assert uid == pwd.getpwnam(user).pw_uid
    assert any(folder.iterdir()), "the staged array is in the folder"
    return proc, folder


def kill9(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def next_kernel(user: str) -> Path:
    """A new kernel of ``user`` starts (its spill folder is made, as GpuMagics does)."""
    code = "from gpulane.kernel.transfer import default_spill_dir; print(default_spill_dir())"
    result = subprocess.run(
        as_user(user, [sys.executable, "-c", code]),
        env=user_env(user, None),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip())


def test_a_killed_kernels_folder_is_removed_by_the_next_kernel_only_of_its_owner() -> None:
    alice_dead, alice_folder = stage(ALICE)
    bob_dead, bob_folder = stage(BOB)
    alice_live, alice_live_folder = stage(ALICE)
    made: list[Path] = []
    try:
        kill9(alice_dead)
        kill9(bob_dead)
        assert alice_folder.exists() and bob_folder.exists()  # SIGKILL: no cleanup ran

        made.append(next_kernel(ALICE))
        assert not alice_folder.exists(), "alice's next kernel left her dead kernel's folder"
        assert bob_folder.exists() and any(bob_folder.iterdir()), "bob's folder was touched"
        assert alice_live_folder.exists() and any(alice_live_folder.iterdir()), (
            "a live kernel's folder was removed"
        )

        made.append(next_kernel(BOB))
        assert not bob_folder.exists(), "bob's next kernel left his dead kernel's folder"
        assert alice_live_folder.exists()
    finally:
        kill9(alice_live)
        for folder in (alice_folder, bob_folder, alice_live_folder, *made):
            subprocess.run(["rm", "-rf", "--", str(folder)], check=False)


def test_a_planted_look_alike_is_never_followed_or_removed(tmp_path: Path) -> None:
    """bob plants names that look like alice's stale folders; alice's kernel leaves them."""
    alice_uid = pwd.getpwnam(ALICE).pw_uid
    shm = Path("/dev/shm")
    dead_pid = 2**22 + 1  # above any pid_max: surely not a running process
    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep").write_text("keep")
    os.chmod(tmp_path, 0o755)
    namespace = os.stat("/proc/self/ns/pid").st_ino  # the test users' kernels share ours
    planted_link = shm / f"gpulane-{alice_uid}-{namespace}-{dead_pid}-1-link"
    planted_dir = shm / f"gpulane-{alice_uid}-{namespace}-{dead_pid}-1-dir"
    plant = (
        f"import os; os.symlink({str(target)!r}, {str(planted_link)!r}); "
        f"os.mkdir({str(planted_dir)!r}, 0o700)"
    )
    subprocess.run(as_user(BOB, [sys.executable, "-c", plant]), env=user_env(BOB, None), check=True)
    made: Path | None = None
    try:
        made = next_kernel(ALICE)
        assert planted_link.is_symlink() and (target / "keep").exists()
        assert planted_dir.exists() and stat.S_IMODE(planted_dir.stat().st_mode) == 0o700
    finally:
        for path in (planted_link, planted_dir, made):
            if path is not None:
                subprocess.run(["rm", "-rf", "--", str(path)], check=False)
