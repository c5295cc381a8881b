"""Shared fixtures: real Unix users, a real broker process on a temporary socket."""

from __future__ import annotations

import contextlib
import grp
import importlib
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


# ---------------------------------------------------------------------- kernels


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
            argv=_as_user(
                user, [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
            ),
            display_name=f"python as {user}",
            language="python",
        )
        self.km.connection_file = str(home / "kernel.json")
        env = _user_env(user, broker.socket if broker else None)
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


# ---------------------------------------------------------------------- Slurm

SLURM_PORT = 6847  # apart from the default, so a developer's own cluster is left alone


@dataclass
class SlurmCluster:
    """A real one-node Slurm (tools/slurmlocal.py) with one simulated GPU."""

    folder: Path
    env: dict[str, str]
    homes: Path

    def user_env(self, user: str) -> dict[str, str]:
        env = _user_env(user, None)
        env.update(self.env, GPULANE_BACKEND="slurm", HOME=str(self.homes / user))
        return env

    def gpulane(self, user: str, *args: str, **popen: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(
            _as_user(user, [sys.executable, "-m", "gpulane", *args]),
            env=self.user_env(user),
            cwd=self.homes / user,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **popen,
        )

    def call(self, user: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = self.gpulane(user, *args)
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def squeue(self) -> list[list[str]]:
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i|%u|%T|%j"],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
        ).stdout
        return [line.split("|") for line in out.splitlines()]


@pytest.fixture(scope="session")
def slurm_cluster(unix_users: tuple[str, ...]) -> Iterator[SlurmCluster]:
    need(os.geteuid() == 0, "the Slurm tests start slurmctld and slurmd, which needs root")
    from tools.slurmlocal import start_cluster, stop_cluster

    folder = Path(tempfile.mkdtemp(prefix="gpulane-slurm-"))
    folder.chmod(0o755)
    env = start_cluster(folder, gpus=1, users=list(unix_users), port=SLURM_PORT)
    homes = folder / "homes"
    homes.mkdir(mode=0o755)
    for user in unix_users:
        entry = pwd.getpwnam(user)
        (homes / user).mkdir(mode=0o700)
        os.chown(homes / user, entry.pw_uid, entry.pw_gid)
    yield SlurmCluster(folder, env, homes)
    stop_cluster(folder)
    shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------- JupyterHub


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch_hub(
    config: Path, state: Path, url: str, env: dict[str, str] | None = None, broker: bool = True
) -> subprocess.Popen[bytes]:
    """Start ``jupyterhub -f config`` (its log in state/jupyterhub.log); return once its API
    answers, and its managed broker listens where ``broker`` is True."""
    import requests

    hub_bin = str(Path(sys.executable).parent / "jupyterhub")
    log_path = state / "jupyterhub.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [hub_bin, "-f", str(config)], cwd=state, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    deadline = time.monotonic() + 60
    while True:
        try:
            ready = requests.get(f"{url}/hub/api/", timeout=2).status_code == 200
            if ready and (not broker or (state / "run" / "broker.sock").exists()):
                return proc
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(
                f"the hub did not start: {log_path.read_text(errors='replace')[-3000:]}"
            )
        time.sleep(0.2)


def stop_hub(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """The hub stops its proxy, its managed services and the servers it started."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class RunningHub:
    """A real JupyterHub started from the project's own demo configuration."""

    url: str
    state: Path
    passwords: dict[str, str]
    proc: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return (self.state / "jupyterhub.log").read_text(errors="replace")


@contextlib.contextmanager
def running_demo_hub(
    prefix: str, extra_config: Callable[[Path], str] | None = None
) -> Iterator[RunningHub]:
    """A hub from the project's demo configuration on free ports, plus ``extra_config(state)``."""
    need(
        shutil.which("configurable-http-proxy") is not None,
        "configurable-http-proxy is not installed",
    )
    from gpulane.demo.hub import prepare

    state = Path(tempfile.mkdtemp(prefix=prefix))
    port = free_port()
    config, passwords = prepare(
        state,
        port=port,
        dashboard_port=free_port(),
        hub_port=free_port(),
        proxy_api_port=free_port(),
    )
    if extra_config is not None:
        with open(config, "a") as handle:
            handle.write(extra_config(state))
    url = f"http://127.0.0.1:{port}"
    proc = launch_hub(config, state, url)
    try:
        yield RunningHub(url, state, passwords, proc)
    finally:
        stop_hub(proc)
        subprocess.run(
            ["pkill", "-f", f"{state}/"], check=False
        )  # servers and the broker of this hub
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def hub(unix_users: tuple[str, ...]) -> Iterator[RunningHub]:
    need(os.geteuid() == 0, "the hub tests spawn servers as real Unix users, which needs root")
    with running_demo_hub("gpulane-hub-") as running:
        yield running
