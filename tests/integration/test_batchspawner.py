"""Each user's whole server as a Slurm job (GpulaneSlurmSpawner), with ``%%gpu`` inside it.

A real JupyterHub (configure_slurm_spawner, the demo login) on the real one-node
Slurm of the ``slurm_cluster`` fixture: the server is a Slurm job without a GPU,
and a ``%%gpu`` cell in it runs as a second Slurm job that gets the one GPU.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.support.hubclient import HubUser
from tests.support.hubs import free_port, launch_hub, stop_hub
from tests.support.users import need, need_module, wait_for

ALICE, BOB = "gpl-alice", "gpl-bob"
SERVER_JOB = "jupyterhub-server"

CONFIG = """
from gpulane.hub.batch import configure_slurm_spawner
from gpulane.demo.auth import DemoAuthenticator

c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.ConfigurableHTTPProxy.pid_file = "{state}/proxy.pid"
c.JupyterHub.db_url = "sqlite:///{state}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{state}/jupyterhub_cookie_secret"
c.JupyterHub.authenticator_class = DemoAuthenticator
c.DemoAuthenticator.password_file = "{state}/passwords.json"
c.Authenticator.allowed_users = {{"{alice}", "{bob}"}}
configure_slurm_spawner(
    c,
    partition="gpu",
    req_runtime="0:15:00",
    home_dir="{homes}/{{username}}",
    single_machine=True,
    start_timeout=120,
)
c.GpulaneSlurmSpawner.startup_poll_interval = 0.2
"""


@dataclass
class BatchHub:
    url: str
    state: Path
    passwords: dict[str, str]
    proc: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return (self.state / "jupyterhub.log").read_text(errors="replace")


def server_jobs(cluster, user: str) -> list[tuple[str, str]]:
    """(job id, state) of ``user``'s server jobs in the queue."""
    return [(i, s) for i, u, s, n in cluster.squeue() if u == user and n == SERVER_JOB]


def scontrol_job(cluster, job_id: str) -> str:
    return subprocess.run(
        ["scontrol", "show", "job", job_id],
        env={**os.environ, **cluster.env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.fixture(scope="module")
def batch_hub(slurm_cluster) -> Iterator[BatchHub]:
    need_module("batchspawner")
    need(
        shutil.which("configurable-http-proxy") is not None,
        "configurable-http-proxy is not installed",
    )
    from gpulane.demo.auth import write_password_file
    from gpulane.hub.config import install_kernel_extension

    install_kernel_extension()  # %%gpu in every kernel, as `gpulane demo` does
    state = Path(tempfile.mkdtemp(prefix="gpulane-batchhub-"))
    passwords = {user: secrets.token_urlsafe(9) for user in (ALICE, BOB)}
    write_password_file(state / "passwords.json", passwords)
    port = free_port()
    config = state / "jupyterhub_config.py"
    config.write_text(
        CONFIG.format(
            port=port,
            hub_port=free_port(),
            proxy_api_port=free_port(),
            state=state,
            homes=slurm_cluster.homes,
            alice=ALICE,
            bob=BOB,
        )
    )
    url = f"http://127.0.0.1:{port}"
    proc = launch_hub(config, state, url, env={**os.environ, **slurm_cluster.env}, broker=False)
    running = BatchHub(url, state, passwords, proc)
    yield running
    stop_hub(proc, timeout=60)  # the hub stops (scancels) the servers it started
    for user in (ALICE, BOB):  # whatever the hub could not stop
        subprocess.run(
            ["scancel", f"--user={user}", f"--name={SERVER_JOB}"],
            env={**os.environ, **slurm_cluster.env},
            check=False,
        )
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def alice(batch_hub) -> Iterator[HubUser]:
    user = HubUser(batch_hub.url, ALICE)
    assert user.login(batch_hub.passwords[ALICE]).status_code == 302
    user.make_token()
    yield user
    user.close()


def stop_server(user: HubUser, cluster, job_id: str) -> None:
    response = user.api("DELETE", f"/users/{user.name}/server")
    assert response.status_code in (202, 204), response.text
    wait_for(lambda: job_id not in [i for i, _, _, _ in cluster.squeue()], 60,
             what="the server job to leave the queue")  # fmt: skip


@pytest.mark.timeout(300)
def test_the_server_is_a_slurm_job_and_a_gpu_cell_runs_in_a_job_of_its_own(
    batch_hub, alice, slurm_cluster
):
    alice.start_server(timeout=120)
    jobs = server_jobs(slurm_cluster, ALICE)
    assert len(jobs) == 1 and jobs[0][1] == "RUNNING", slurm_cluster.squeue()
    server_job = jobs[0][0]
    details = scontrol_job(slurm_cluster, server_job)
    assert "gres/gpu" not in details and "TresPerNode" not in details  # the GPU stays free
    assert f"WorkDir={slurm_cluster.homes / ALICE}" in details
    assert "at 127.0.0.1:" in batch_hub.log_text()  # the hub reaches the server on loopback
    server_log = slurm_cluster.homes / ALICE / f".jupyterhub-slurm-{server_job}.log"
    assert server_log.stat().st_uid == pwd.getpwnam(ALICE).pw_uid  # written as alice, in her home

    kernel = alice.new_kernel()
    setup = alice.run(
        kernel,
        "import os\nserver_job = os.environ['SLURM_JOB_ID']\nbase = 40\n"
        "print(server_job, os.environ['GPULANE_BACKEND'], 'GPULANE_SOCKET' in os.environ, os.getcwd())",
    )
    assert setup.reply["status"] == "ok", setup.messages
    assert setup.stream().split() == [
        server_job,
        "slurm",
        "False",
        str(slurm_cluster.homes / ALICE),
    ]

    cell = alice.run(
        kernel,
        "%%gpu --time 5m\n"
        "import os\n"
        "print('cell job', os.environ['SLURM_JOB_ID'], 'gpus', os.environ['CUDA_VISIBLE_DEVICES'], 'as', os.environ['USER'])\n"
        "answer = base + 2\n",
        timeout=120,
    )
    assert cell.reply["status"] == "ok", cell.messages
    words = cell.stream().split()
    assert words[:2] == ["cell", "job"] and words[3:] == ["gpus", "0", "as", ALICE], words
    assert words[2] != server_job  # a nested job of its own, not the server's
    back = alice.run(kernel, "print(answer, os.environ['SLURM_JOB_ID'] == server_job)")
    assert back.stream().split() == ["42", "True"]

    # The server's token may report a port while it starts, and nothing else, ever.
    token = alice.run(kernel, "print(os.environ['JUPYTERHUB_API_TOKEN'])").stream().strip()
    marker = Path(tempfile.gettempdir()) / f"gpulane-batch-marker-{secrets.token_hex(4)}"
    endpoint = f"{batch_hub.url}/hub/api/batchspawner"
    hostile = {"exec_prefix": f"touch {marker} ;", "batch_cancel_cmd": f"touch {marker}",
               "job_id": f"1; touch {marker}"}  # fmt: skip
    for body, status in ((hostile, 400), ({"port": 1234, "ip": "example.org"}, 400),
                         ({"port": 1234}, 409)):  # fmt: skip
        answer = requests.post(
            endpoint, json=body, headers={"Authorization": f"token {token}"}, timeout=30
        )
        assert answer.status_code == status, answer.text
    not_the_server = requests.post(
        endpoint, json={"port": 1234}, headers={"Authorization": f"token {alice.token}"}, timeout=30
    )
    assert not_the_server.status_code == 403
    stop_server(alice, slurm_cluster, server_job)
    assert not marker.exists()


@pytest.mark.timeout(300)
def test_user_options_never_reach_the_batch_script(batch_hub, slurm_cluster):
    bob = HubUser(batch_hub.url, BOB)
    try:
        assert bob.login(batch_hub.passwords[BOB]).status_code == 302
        bob.make_token()
        hostile = {
            "gres": "gpu:1",
            "options": "--gres=gpu:1",
            "partition": "elsewhere",
            "prologue": "echo injected-prologue",
            "cmd": "echo injected-cmd",
            "homedir": "/tmp\n#SBATCH --gres=gpu:1",
        }
        response = bob.api("POST", f"/users/{BOB}/server", json={"user_options": hostile})
        assert response.status_code in (201, 202), response.text
        bob.start_server(timeout=120)
        ((job_id, state),) = server_jobs(slurm_cluster, BOB)
        assert state == "RUNNING"
        details = scontrol_job(slurm_cluster, job_id)
        assert "Partition=gpu" in details and "gres/gpu" not in details
        script = subprocess.run(
            ["scontrol", "write", "batch_script", job_id, "-"],
            env={**os.environ, **slurm_cluster.env},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "#SBATCH --job-name=jupyterhub-server" in script
        assert "injected" not in script and "gres" not in script and "elsewhere" not in script
        assert "ignoring user_options" in batch_hub.log_text()
        stop_server(bob, slurm_cluster, job_id)
    finally:
        bob.close()


def test_the_helper_refuses_values_that_could_change_the_script():
    need_module("batchspawner")
    from traitlets.config import Config

    from gpulane.hub.batch import (
        GpulaneSlurmSpawner,
        SlurmSpawnerConfigError,
        configure_slurm_spawner,
    )

    for bad in (
        {"partition": "gpu\n#SBATCH --gres=gpu:1"},
        {"req_memory": "4G; rm -rf ~"},
        {"extra_sbatch": ["--constraint=cpu --gres=gpu:1"]},
        {"extra_sbatch": ["--gres=gpu:1"]},
        {"extra_sbatch": "--exclusive"},
        {"home_dir": "relative/{username}"},
    ):
        with pytest.raises(SlurmSpawnerConfigError):
            configure_slurm_spawner(Config(), **bad)
    c = Config()
    c.Spawner.environment = {"GPULANE_SOCKET": "/run/gpulane/broker.sock", "KEEP": "1"}
    configure_slurm_spawner(
        c,
        partition="interactive",
        req_memory="4G",
        extra_sbatch=["--exclusive"],
        bin_dir="/opt/jh/bin",
    )
    assert c.JupyterHub.spawner_class is GpulaneSlurmSpawner
    assert c.GpulaneSlurmSpawner.req_partition == "interactive"
    assert c.GpulaneSlurmSpawner.extra_sbatch == ["--exclusive"]
    assert (
        c.GpulaneSlurmSpawner.batchspawner_singleuser_cmd == "/opt/jh/bin/batchspawner-singleuser"
    )
    assert c.Spawner.cmd == ["/opt/jh/bin/jupyterhub-singleuser"]
    assert c.Spawner.environment == {"KEEP": "1", "GPULANE_BACKEND": "slurm"}
