"""Real IPython kernels (ipykernel) run as test users, driven through jupyter_client."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.broker import BrokerProcess
from tests.support.users import as_user, user_env


@dataclass
class CellResult:
    """What a kernel sent for one execute request, with arrival times."""

    messages: list[tuple[float, str, dict]]  # (seconds since execute, msg_type, content)
    reply: dict

    @property
    def status(self) -> str:
        return str(self.reply["status"])

    def stream(self, name: str = "stdout") -> str:
        return "".join(
            c["text"] for _, t, c in self.messages if t == "stream" and c["name"] == name
        )

    def of_type(self, *types: str) -> list[dict]:
        return [c for _, t, c in self.messages if t in types]

    def texts(self) -> list[str]:
        """text/plain of every display and display update, in order."""
        return [
            c["data"].get("text/plain", "")
            for _, t, c in self.messages
            if t in ("display_data", "update_display_data", "execute_result")
        ]

    def error(self) -> dict | None:
        errors = self.of_type("error")
        return errors[-1] if errors else None


class UserKernel:
    """A real IPython kernel (ipykernel) running as a Unix user, driven through jupyter_client."""

    def __init__(
        self,
        user: str,
        broker: BrokerProcess | None,
        folder: Path,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        from jupyter_client import KernelManager
        from jupyter_client.kernelspec import KernelSpec

        class OwnedConnectionFile(KernelManager):  # type: ignore[misc]
            """The kernel runs as the user, so the connection file must be theirs."""

            def write_connection_file(self, **kwargs: object) -> None:
                super().write_connection_file(**kwargs)
                os.chown(self.connection_file, entry.pw_uid, entry.pw_gid)

        self.user = user
        entry = pwd.getpwnam(user)
        home = folder / user
        home.mkdir(mode=0o700, exist_ok=True)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        self.km = OwnedConnectionFile()
        self.km._kernel_spec = KernelSpec(
            argv=as_user(
                user, [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
            ),
            display_name=f"python as {user}",
            language="python",
        )
        self.km.connection_file = str(home / "kernel.json")
        env = user_env(user, broker.socket if broker else None)
        env.update(HOME=str(home), JUPYTER_RUNTIME_DIR=str(home), IPYTHONDIR=str(home / ".ipython"))
        env.update(extra_env or {})
        self.km.start_kernel(env=env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    @property
    def pid(self) -> int:
        return int(self.km.provisioner.process.pid)  # type: ignore[union-attr]

    def execute(self, code: str, timeout: float = 60) -> CellResult:
        return self.collect(self.kc.execute(code), timeout)

    def submit(self, code: str) -> str:
        """Send without waiting; collect() the result later."""
        return str(self.kc.execute(code))

    def collect(self, msg_id: str, timeout: float = 60) -> CellResult:
        started = time.monotonic()
        messages: list[tuple[float, str, dict]] = []
        deadline = started + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no idle status for {msg_id} within {timeout} s: {messages}")
            try:
                msg = self.kc.get_iopub_msg(timeout=remaining)
            except Exception:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "status" and msg["content"]["execution_state"] == "idle":
                break
            messages.append((time.monotonic() - started, kind, msg["content"]))
        reply = self.kc.get_shell_msg(timeout=10)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.kc.get_shell_msg(timeout=10)
        return CellResult(messages, reply["content"])

    def wait_for_output(
        self, msg_id: str, needle: str, timeout: float = 30
    ) -> list[tuple[float, str, dict]]:
        """Read iopub until some output of ``msg_id`` contains ``needle``; returns what was read."""
        seen: list[tuple[float, str, dict]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.kc.get_iopub_msg(timeout=0.5)
            except Exception:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            content = msg["content"]
            seen.append((0.0, msg["msg_type"], content))
            text = content.get("text") or (content.get("data") or {}).get("text/plain", "")
            if needle in str(text):
                return seen
        raise AssertionError(f"{needle!r} did not appear within {timeout} s: {seen}")

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.kc.stop_channels()
        with contextlib.suppress(Exception):
            self.km.shutdown_kernel(now=True)


@pytest.fixture
def kernels(unix_users: tuple[str, ...]) -> Iterator[Callable[..., UserKernel]]:
    """Start kernels as test users against a broker; each gets ``%load_ext gpulane`` already run."""
    folder = Path(tempfile.mkdtemp(prefix="gpulane-kernels-"))
    folder.chmod(0o755)
    started: list[UserKernel] = []

    def factory(
        user: str, broker: BrokerProcess | None, env: dict[str, str] | None = None
    ) -> UserKernel:
        kernel = UserKernel(user, broker, folder, env)
        started.append(kernel)
        loaded = kernel.execute("%load_ext gpulane")
        assert loaded.status == "ok", loaded.messages
        return kernel

    yield factory
    for kernel in started:
        kernel.shutdown()
    shutil.rmtree(folder, ignore_errors=True)
