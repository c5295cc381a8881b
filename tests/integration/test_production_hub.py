"""docs/admin-hub.md, followed as a new admin would: `gpulane hub init` on this machine (issue 15).

As root and without systemd (CI), into temporary folders and free ports: the one command,
the hub started with the command the unit runs, PAM logins of real Unix users with
passwords, a ``%%gpu`` cell through the server, a second user refused with the fix, let in
with that documented command, a hub restart (in seconds, no traceback) that both servers
live through, and ``gpulane doctor`` exit 0. Every command block on the page is either
run here (``<!-- tested -->``) or marked ``<!-- example -->``.
"""

from __future__ import annotations

import contextlib
import grp
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.support.hubclient import HubUser, server_ready
from tests.support.hubs import free_port
from tests.support.users import need

DOC = Path(__file__).parents[2] / "docs" / "admin-hub.md"
GPU_GROUP, ADMIN_GROUP = "gpl-prod-gpu", "gpl-prod-adm"
ALICE, BOB = "gpl-prod-alice", "gpl-prod-bob"
GPULANE = str(Path(sys.executable).parent / "gpulane")
CELL = "%%gpu\nimport os\nprint('on GPU', os.environ.get('CUDA_VISIBLE_DEVICES'))\n"

# The page's tested lines, each as this test runs it (folders and ports of its own).
TESTED_LINES = {
    "gpulane hub init --dry-run",
    "gpulane hub init",
    "usermod -a -G gpu USER",
    "gpulane doctor",
}


@dataclass
class Site:
    root: Path
    port: int
    init_args: list[str]
    hub_command: str
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config(self) -> Path:
        return self.root / "etc" / "jupyterhub_config.py"


def init(site_args: list[str], *more: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GPULANE, "hub", "init", *site_args, *more], capture_output=True, text=True, timeout=120
    )


def start_hub(site: Site) -> subprocess.Popen[bytes]:
    """The unit's command, as a background service gets it: SIGINT ignored (inherited by
    the managed services; JupyterHub stops them with SIGINT first)."""
    with open(site.log, "ab") as log:
        proc = subprocess.Popen(
            ["bash", "-c", site.hub_command],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if (
                requests.get(f"{site.url}/hub/api/", timeout=2).status_code == 200
                and (site.root / "run" / "broker.sock").exists()
            ):
                return proc
        assert proc.poll() is None, site.log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"the hub did not start: {site.log.read_text(errors='replace')[-3000:]}")


def stop_hub(proc: subprocess.Popen[bytes]) -> float:
    started = time.monotonic()
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return time.monotonic() - started


def make_user(name: str) -> str:
    password = "pw-" + os.urandom(6).hex()
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
    subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
    return password


def remove_user(name: str) -> None:
    subprocess.run(["pkill", "-KILL", "-u", name], check=False)
    time.sleep(0.2)
    subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)


def all_text(run: object) -> str:
    reply = getattr(run, "reply", {})
    return "\n".join(
        [run.stream("stdout"), run.stream("stderr"), *run.texts(), str(reply.get("evalue", ""))]  # type: ignore[attr-defined]
    )


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    need(os.geteuid() == 0, "gpulane hub init sets up users and groups: needs root")
    need(shutil.which("configurable-http-proxy") is not None, "configurable-http-proxy is missing")
    for name in (ALICE, BOB):
        remove_user(name)  # a previous run's, if it was killed
    for group in (GPU_GROUP, ADMIN_GROUP):
        subprocess.run(["groupdel", group], check=False, capture_output=True)
    root = Path(tempfile.mkdtemp(prefix="gpl-prod-"))
    root.chmod(0o755)  # users' kernels reach the broker's socket inside
    port = free_port()
    args = [
        "--port", str(port), "--hub-port", str(free_port()),
        "--proxy-api-port", str(free_port()), "--dashboard-port", str(free_port()),
        "--config-dir", str(root / "etc"), "--state-dir", str(root / "hub"),
        "--broker-state-dir", str(root / "broker"), "--socket", str(root / "run" / "broker.sock"),
        "--bin-dir", str(root / "bin"), "--unit-dir", str(root / "systemd"),
        "--simulate-gpus", "1", "--slices", "2",
        "--gpu-group", GPU_GROUP, "--admin-group", ADMIN_GROUP,
    ]  # fmt: skip
    try:
        yield Site(root, port, args, "", root / "hub.log")
    finally:
        subprocess.run(["pkill", "-f", f"{root}/"], check=False)
        for name in (ALICE, BOB):
            remove_user(name)
        for group in (GPU_GROUP, ADMIN_GROUP):
            subprocess.run(["groupdel", group], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_the_page_marks_every_command_block_tested_or_example():
    text = DOC.read_text()
    blocks = re.findall(r"(<!-- (tested|example) -->\n)?```(bash|sh|console)\n(.*?)```", text, re.S)
    assert blocks, "admin-hub.md has no command blocks"
    unmarked = [body for marker, _, _, body in blocks if not marker]
    assert not unmarked, f"command blocks neither tested nor marked as an example: {unmarked}"
    tested = {
        line.split("#")[0].strip()
        for marker, kind, _, body in blocks
        if kind == "tested"
        for line in body.splitlines()
        if line.split("#")[0].strip()
    }
    assert tested == TESTED_LINES


def test_one_command_sets_up_a_hub_that_outlives_a_restart(site: Site):
    # --dry-run writes nothing and shows every file.
    dry = init(site.init_args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would write" in dry.stdout and "PAMAuthenticator" in dry.stdout
    assert not (site.root / "etc").exists()

    # The one command; then again, which changes nothing.
    first = init(site.init_args)
    assert first.returncode == 0, first.stdout + first.stderr
    again = init(site.init_args)
    assert again.returncode == 0, again.stderr
    assert "wrote" not in again.stdout and "ran:" not in again.stdout, again.stdout
    assert stat_mode(site.root / "hub") == 0o700
    assert stat_mode(site.root / "hub" / "jupyterhub_cookie_secret") == 0o600
    assert (site.root / "systemd" / "jupyterhub.service").exists()
    assert os.readlink(site.root / "bin" / "gpulane") == GPULANE
    grp.getgrnam(GPU_GROUP), grp.getgrnam(ADMIN_GROUP)
    command = next(
        line.strip() for line in first.stdout.splitlines() if line.strip().startswith("cd ")
    )
    unit = (site.root / "systemd" / "jupyterhub.service").read_text()
    assert f"ExecStart={shlex.split(command)[-3]} -f {site.config}" in unit  # the same command
    site.hub_command = command

    passwords = {ALICE: make_user(ALICE), BOB: make_user(BOB)}
    subprocess.run(["usermod", "-a", "-G", GPU_GROUP, ALICE], check=True)
    proc = start_hub(site)
    try:
        users = {}
        for name, password in passwords.items():
            user = HubUser(site.url, name)
            assert user.login(password).status_code == 302, f"PAM login of {name} failed"
            user.make_token()
            user.start_server()
            user.kernel = user.new_kernel()  # type: ignore[attr-defined]
            users[name] = user
        alice, bob = users[ALICE], users[BOB]

        ran = alice.run(alice.kernel, CELL)  # type: ignore[attr-defined]
        assert "on GPU 0" in ran.stream(), all_text(ran)

        refused = bob.run(bob.kernel, CELL)  # type: ignore[attr-defined]
        fix = re.search(r"usermod -a -G \S+ \S+", all_text(refused))
        assert fix and fix.group(0) == f"usermod -a -G {GPU_GROUP} {BOB}", all_text(refused)
        subprocess.run(shlex.split(fix.group(0)), check=True)
        ran = bob.run(bob.kernel, CELL)  # type: ignore[attr-defined]
        assert "on GPU 0" in ran.stream(), all_text(ran)

        # A terminal's gpulane is this environment's; its groups are the same Unix ones.
        path = dict(re.findall(r"(PATH)=(\S+)", command))["PATH"]
        assert path.startswith(str(Path(GPULANE).parent) + ":")

        # Restart: in seconds, no traceback; both servers and kernels still there.
        seconds = stop_hub(proc)
        assert seconds < 10, f"the hub took {seconds:.1f} s to stop"
        proc = start_hub(site)
        for user in users.values():
            assert server_ready(user), f"{user.name}'s server did not outlive the restart"
        ran = alice.run(alice.kernel, CELL)  # type: ignore[attr-defined]
        assert "on GPU 0" in ran.stream(), all_text(ran)

        doctor = subprocess.run(
            [GPULANE, "doctor", "--hub-config", str(site.config)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "SLURM_CONF": ""},
        )
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "broker" in doctor.stdout and "0 failed" in doctor.stdout
        for user in users.values():
            user.close()
    finally:
        seconds = stop_hub(proc)
        log = site.log.read_text(errors="replace")
    assert seconds < 10, f"the hub took {seconds:.1f} s to stop"
    assert "Traceback" not in log, log[-4000:]


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777
