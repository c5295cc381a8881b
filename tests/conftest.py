"""Shared fixtures: real Unix users, a real broker process on a temporary socket."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

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
        _as_user("gpl-bob", [sys.executable, "-c", "import gpulane"]),
        capture_output=True,
        text=True,
        env=_user_env("gpl-bob", None),
    )
    need(
        probe.returncode == 0,
        f"other users cannot run {sys.executable} with gpulane installed "
        f"({probe.stderr.strip()[-200:]}); run the tests through scripts/test.sh",
    )
    return USERS


def _as_user(user: str, argv: list[str]) -> list[str]:
    # setpriv execs (no extra parent process): the PID we get is the client's own.
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *argv]


def _user_env(user: str, sock: Path | None) -> dict[str, str]:
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


@dataclass
class BrokerProcess:
    """A real ``gpulane broker`` process with simulated GPUs in a private temporary folder."""

    folder: Path
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)
    clients: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.folder / "run" / "broker.sock"

    def start(self) -> None:
        log = self.folder / f"broker-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gpulane",
                    "broker",
                    "--socket",
                    str(self.socket),
                    "--state-dir",
                    str(self.folder / "state"),
                    *self.args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited: {self.log_text()}")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(self.socket))
                return
            time.sleep(0.05)
        raise RuntimeError(f"broker did not listen within 15 s: {self.log_text()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    # -------------------------------------------------------------- clients

    def gpulane(self, user: str | None, *args: str) -> list[str]:
        argv = [sys.executable, "-m", "gpulane", *args]
        return _as_user(user, argv) if user else argv

    def env(self, user: str | None) -> dict[str, str]:
        return _user_env(user or "root", self.socket)

    def spawn(self, user: str | None, *args: str) -> subprocess.Popen[str]:
        """Start ``gpulane ARGS`` as ``user`` (None: as the test runner)."""
        proc = subprocess.Popen(
            self.gpulane(user, *args),
            env=self.env(user),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.clients.append(proc)
        return proc

    def reap_clients(self) -> None:
        """Kill clients a test left running and close their pipes."""
        for proc in self.clients:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()

    def call(
        self, user: str | None, *args: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.gpulane(user, *args),
            env=self.env(user),
            capture_output=True,
            text=True,
            timeout=timeout,
        )


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


@pytest.fixture
def make_broker() -> Iterator[Callable[..., BrokerProcess]]:
    """Start brokers with extra options; each is stopped and its folder removed afterwards."""
    started: list[BrokerProcess] = []

    def factory(*args: str) -> BrokerProcess:
        folder = Path(tempfile.mkdtemp(prefix="gpulane-test-"))
        folder.chmod(0o755)  # other users must reach the socket inside
        broker = BrokerProcess(folder, list(args))
        broker.start()
        started.append(broker)
        return broker

    yield factory
    for broker in started:
        broker.reap_clients()
        broker.stop()
        shutil.rmtree(broker.folder, ignore_errors=True)


def wait_for(predicate: Callable[[], object], timeout: float = 15, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
