"""Real Unix users for the multi-user tests, and the rule for missing prerequisites.

A prerequisite that is missing (root, a tool, a module) skips a test locally with its
reason; under ``CI=true`` it fails the test instead, so CI never passes by skipping.
"""

from __future__ import annotations

import grp
import importlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI") == "true"
USERS = ("gpl-alice", "gpl-bob", "gpl-carol")
GPU_GROUP = "gpl-gpu"  # alice and carol
ADMIN_GROUP = "gpl-admins"  # carol


def need(condition: bool, reason: str) -> None:
    """Skip locally with a reason; under CI a missing prerequisite is a failure, not a skip."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def need_module(name: str) -> Any:
    """Import a module the test needs (skip locally without it; fail under CI)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        need(False, f"{name} is not installed (scripts/test.sh installs it)")


def wait_for(predicate: Callable[[], object], timeout: float = 15, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def as_user(user: str, argv: list[str]) -> list[str]:
    """``argv`` run as ``user`` with their groups."""
    # setpriv execs (no extra parent process): the PID we get is the client's own.
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *argv]


def user_env(user: str, sock: Path | None) -> dict[str, str]:
    """A clean environment for ``user``'s processes, pointed at the broker socket ``sock``."""
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": "/tmp",
        "USER": user,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if sock is not None:
        env["GPULANE_SOCKET"] = str(sock)
    return env


def _ensure_group(name: str) -> None:
    try:
        grp.getgrnam(name)
    except KeyError:
        subprocess.run(["groupadd", name], check=True)


def _ensure_user(name: str, groups: list[str]) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True)
    if groups:
        subprocess.run(["usermod", "-a", "-G", ",".join(groups), name], check=True)


@pytest.fixture(scope="session")
def unix_users() -> tuple[str, ...]:
    """gpl-alice, gpl-bob, gpl-carol as real Unix users (needs root: CI runs as root)."""
    need(os.geteuid() == 0, "multi-user tests need root to create Unix users")
    _ensure_group(GPU_GROUP)
    _ensure_group(ADMIN_GROUP)
    _ensure_user("gpl-alice", [GPU_GROUP])
    _ensure_user("gpl-bob", [])
    _ensure_user("gpl-carol", [GPU_GROUP, ADMIN_GROUP])
    probe = subprocess.run(
        as_user("gpl-bob", [sys.executable, "-c", "import gpulane"]),
        capture_output=True,
        text=True,
        env=user_env("gpl-bob", None),
    )
    need(
        probe.returncode == 0,
        f"other users cannot run {sys.executable} with gpulane installed "
        f"({probe.stderr.strip()[-200:]}); run the tests through scripts/test.sh",
    )
    return USERS


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder every test user can write to (for marker files that show order and overlap)."""
    folder = Path(tempfile.mkdtemp(prefix="gpulane-shared-"))
    folder.chmod(
        0o777
    )  # no sticky bit: fs.protected_regular would stop users appending to each other's files
    order = folder / "order"
    order.touch()
    order.chmod(0o666)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs the real users ``root``: ``-m "not root"`` deselects them."""
    for item in items:
        if "unix_users" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.root)
