"""The pod keeper process, the lease's command for a Kubernetes GPU server, against the loopback API.

It must live exactly as long as its pod: exit when the pod is deleted or finishes (the
lease then ends), and delete the pod when the lease is revoked (SIGTERM from the broker).
A hub pod restart kills every keeper with the broker: the restarted broker starts new
keepers for the pods that still run (broker/pod_leases.py) and ends the others' leases.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.kube_api import Store, kill_keepers, kube_api
from tests.support.users import need_module, wait_for


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[Store, Path]]:
    need_module("kubernetes")
    with kube_api(tmp_path) as served:
        yield served


def keeper(store: Store, kubeconfig: Path, name: str = "jupyter-ada") -> subprocess.Popen[str]:
    _, made = store.put("pods", "jhub", {"metadata": {"name": name}, "spec": {"containers": []}})
    store.patch("pods", "jhub", name, {"status": {"phase": "Running"}})
    argv = [sys.executable, "-m", "gpulane.hub.pod_keeper", "--namespace", "jhub",
            "--pod", name, "--uid", made["metadata"]["uid"]]  # fmt: skip
    env = {"PATH": os.environ["PATH"], "KUBECONFIG": str(kubeconfig)}
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()  # once it has read the pod, it watches it
    assert "following the pod for its GPU lease" in line, line + proc.communicate()[1]
    time.sleep(0.3)
    return proc


def ended(proc: subprocess.Popen[str]) -> str:
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return err


def test_the_keeper_ends_when_its_pod_is_deleted(api: tuple[Store, Path]) -> None:
    store, kubeconfig = api
    proc = keeper(store, kubeconfig)
    other = keeper(store, kubeconfig, "jupyter-ben")
    other.kill()
    other.communicate()
    store.delete("pods", "jhub", "jupyter-ben")
    time.sleep(0.5)
    assert proc.poll() is None
    store.delete("pods", "jhub", "jupyter-ada")
    assert "jhub/jupyter-ada: the pod was deleted; the GPU lease ends" in ended(proc)


def test_the_keeper_ends_when_its_pod_fails(api: tuple[Store, Path]) -> None:
    store, kubeconfig = api
    proc = keeper(store, kubeconfig)
    store.patch("pods", "jhub", "jupyter-ada", {"status": {"phase": "Failed"}})
    assert "the pod was modified; the GPU lease ends" in ended(proc)
    assert store.select("pods", "jhub", "")  # a failed pod is KubeSpawner's to clean up


def test_a_revoked_lease_deletes_the_pod(api: tuple[Store, Path]) -> None:
    store, kubeconfig = api
    proc = keeper(store, kubeconfig)
    proc.send_signal(signal.SIGTERM)  # what the broker sends at the lease's time limit
    assert "the GPU lease was revoked; deleting the pod" in ended(proc)
    assert store.select("pods", "jhub", "") == []


def test_a_pod_gone_before_the_keeper_starts_ends_it_at_once(api: tuple[Store, Path]) -> None:
    _, kubeconfig = api
    argv = [sys.executable, "-m", "gpulane.hub.pod_keeper", "--namespace", "jhub", "--pod", "x"]
    env = {"PATH": os.environ["PATH"], "KUBECONFIG": str(kubeconfig)}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "the pod is gone" in done.stderr


# A stand-in for the hub holding one GPU server's lease as GpulaneKubeSpawner does: it
# queues a detached job whose command names the pod, creates the pod labelled with the
# lease on the grant, and hands the broker a pod keeper as the lease's command.
HUB = """
import subprocess
import sys
from kubernetes import client, config
from gpulane.broker.k8s_capacity import LEASE_LABEL
from gpulane.broker.pod_leases import keeper_argv, pod_command
from gpulane.config import JOB_ID_ENV
from gpulane.jobs import Request
from gpulane.scheduler.embedded import BrokerScheduler
from gpulane.scheduler.spawn import spawn_command

socket, kubeconfig, name = sys.argv[1:4]
core = client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))

def launch(grant_env):
    labels = {LEASE_LABEL: grant_env[JOB_ID_ENV]}
    pod = {"metadata": {"name": name, "labels": labels}, "spec": {"containers": []}}
    made = core.create_namespaced_pod("jhub", pod)
    core.patch_namespaced_pod_status(name, "jhub", {"status": {"phase": "Running"}})
    env = {"PATH": "/usr/bin:/bin", "KUBECONFIG": kubeconfig}
    argv = keeper_argv("jhub", name, made.metadata.uid)
    keeper = spawn_command(argv, env, stdout=subprocess.DEVNULL, death_signal=None)
    print(grant_env[JOB_ID_ENV], keeper.pid, flush=True)
    return keeper

request = Request(gpus=1, time_limit=3600, name="server-gpu",
                  command=pod_command("jhub", name), detached=True)
BrokerScheduler(socket).run(request, launcher=launch)
"""


@pytest.fixture
def keepers_of(api: tuple[Store, Path]) -> Iterator[None]:
    """Afterwards, SIGKILL the pod keepers left on this test's API."""
    yield
    kill_keepers(api[1])


def test_a_gpu_servers_lease_survives_a_hub_pod_restart(
    api: tuple[Store, Path], make_broker: Any, keepers_of: None
) -> None:
    """The broker and every keeper are SIGKILLed (the hub container restarts); a new broker
    on the same state follows the pods that still run and frees the GPUs of the others."""
    from gpulane.scheduler.embedded import BrokerScheduler
    from tests.support.kube_api import gpu_node

    store, kubeconfig = api
    store.put("nodes", "", gpu_node("gpu-1", 3))
    broker = make_broker(
        "--gpu-source", "k8s", "--kubeconfig", str(kubeconfig), "--k8s-namespace", "jhub",
        "--k8s-interval", "1s",
    )  # fmt: skip
    hubs, jobs, keepers = [], {}, []
    for name in ("jupyter-ada", "jupyter-ben", "jupyter-cy"):
        hub = subprocess.Popen(
            [sys.executable, "-c", HUB, str(broker.socket), str(kubeconfig), name],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert hub.stdout is not None
        job_id, keeper_pid = hub.stdout.readline().split()
        hubs.append(hub)
        jobs[name], keepers = int(job_id), [*keepers, int(keeper_pid)]
    client = BrokerScheduler(broker.socket)

    def state(name: str) -> str:
        return str(client.job(jobs[name])["state"])

    def running() -> list[str]:
        return [str(job["name"]) for job in client.snapshot()["running"]]

    wait_for(lambda: all(state(n) == "running" for n in jobs), timeout=60)
    time.sleep(1.0)  # the keepers are registered as the leases' commands (either way works)
    # The container restarts: the broker first, so that it sees nothing end.
    broker.kill9()
    for hub in hubs:
        hub.kill()
        hub.wait()
        assert hub.stdout is not None
        hub.stdout.close()
    for pid in keepers:
        os.kill(pid, signal.SIGKILL)
    store.delete("pods", "jhub", "jupyter-ben")  # deleted while the broker was down
    broker.start()
    assert state("jupyter-ben") == "failed"
    assert "its pod jhub/jupyter-ben was gone while the broker was down" in str(
        client.job(jobs["jupyter-ben"])["message"]
    )
    assert "its pod jhub/jupyter-ada still runs; pod keeper" in broker.log_text()
    # The others stay running while their pods run (past a lease's heartbeat time too).
    time.sleep(3.0)
    assert state("jupyter-ada") == state("jupyter-cy") == "running"
    # ben's GPU is free: one job starts, the next waits for a pod to end.
    first = broker.spawn(None, "run", "--name", "first", "--", "sleep", "120")
    wait_for(lambda: "first" in running(), timeout=60)
    waiting = broker.spawn(None, "run", "--name", "second", "--", "true")
    time.sleep(1.0)
    assert waiting.poll() is None, broker.log_text()
    # A broker process restart alone: the new keepers outlive it, as the hub's do.
    broker.kill9()
    broker.start()
    assert state("jupyter-ada") == "running"
    store.delete("pods", "jhub", "jupyter-ada")  # the server stopped: its GPU is freed
    assert waiting.wait(timeout=60) == 0
    wait_for(lambda: state("jupyter-ada") == "completed", timeout=60)
    # A revoke reaches the pod through the new keeper: it deletes the pod.
    client.cancel(jobs["jupyter-cy"])
    wait_for(lambda: store.select("pods", "jhub", "") == [], timeout=60)
    wait_for(lambda: state("jupyter-cy") == "cancelled", timeout=60)
    first.kill()
    first.wait()
    # Its kept-alive connection closed here, not by the garbage collector at some later
    # moment (an unclosed socket is then a ResourceWarning, an error in whichever test runs).
    client.client.close()
