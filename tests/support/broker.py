"""A real ``gpulane broker`` process on a temporary socket, and clients run as test users."""

from __future__ import annotations

import contextlib
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

from tests.support.users import as_user, user_env


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
        return as_user(user, argv) if user else argv

    def env(self, user: str | None) -> dict[str, str]:
        return user_env(user or "root", self.socket)

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
