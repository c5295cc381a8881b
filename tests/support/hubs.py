"""Real JupyterHubs: started from a config file, or from the project's demo configuration."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.users import need


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
    """The hub stops its proxy and its managed services (the broker); with gpulane's
    ``cleanup_servers = False`` the servers it started keep running."""
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


def profile_spawner_config(state: Path, profiles: str) -> str:
    """Config lines for GpulaneSpawner with ``profiles`` written to state/profiles.toml."""
    (state / "profiles.toml").write_text(profiles)
    return f"""
c.JupyterHub.spawner_class = "gpulane.hub.spawner.GpulaneSpawner"
c.GpulaneSpawner.profiles_file = "{state}/profiles.toml"
c.GpulaneSpawner.broker_socket = "{state}/run/broker.sock"
c.GpulaneSpawner.cmd = c.Spawner.cmd
"""


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
        stop_servers_with_hub=False,  # gpulane's own configuration: servers outlive the hub
    )
    if extra_config is not None:
        with open(config, "a") as handle:
            handle.write(extra_config(state))
    url = f"http://127.0.0.1:{port}"
    proc = launch_hub(config, state, url)
    running = RunningHub(url, state, passwords, proc)
    try:
        yield running
    finally:
        stop_hub(running.proc)  # a test may have restarted it: the latest hub process
        subprocess.run(["pkill", "-f", f"{state}/"], check=False)  # its broker
        for user in passwords:  # servers, kernels and GPU workers outlive the hub
            subprocess.run(["pkill", "-KILL", "-u", user], check=False)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def hub(unix_users: tuple[str, ...]) -> Iterator[RunningHub]:
    need(os.geteuid() == 0, "the hub tests spawn servers as real Unix users, which needs root")
    with running_demo_hub("gpulane-hub-") as running:
        yield running
