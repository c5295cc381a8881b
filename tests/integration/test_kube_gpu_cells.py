"""``%%gpu`` on Kubernetes: a real kernel's cell queues at a real broker, runs in a worker pod.

The broker (``--gpu-source k8s``) reads a one-GPU cluster from the loopback Kubernetes
API; on a grant it creates the cell's worker pod and the Secret of its key. The
test-side node agent runs the worker pod's container (``python -m gpulane.kernel.runner``)
as the pod's user with the Secret mounted as a private file; the worker dials back to the
kernel (a real ipykernel as that user, listening on its "server pod"'s IP, 127.0.0.N).
No JupyterHub: the server pods are objects put in the API by the test, as KubeSpawner
would make them, and the kernels speak to the broker's socket as their Unix users.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import BrokerProcess
from tests.support.kube_agent import NodeAgent
from tests.support.kube_api import Store, gpu_node, kube_api
from tests.support.users import as_user, need_module, user_env, wait_for

ALICE, BOB = "gpl-alice", "gpl-bob"
IPS = {ALICE: "127.0.0.50", BOB: "127.0.0.51"}
NAMESPACE = "jhub"


def server_pod(user: str, ip: str = "") -> dict[str, Any]:
    """A user's running server pod, as KubeSpawner makes it (the parts the broker reads)."""
    ip = ip or IPS[user]
    return {
        "metadata": {
            "name": f"jupyter-{user}",
            "labels": {"component": "singleuser-server", "hub.jupyter.org/username": user},
            "annotations": {"hub.jupyter.org/username": user},
        },
        "spec": {
            "containers": [
                {
                    "name": "notebook",
                    "image": "quay.io/jupyter/pytorch-notebook:2024-12-02",
                    "volumeMounts": [{"name": "home", "mountPath": "/home/jovyan"}],
                }
            ],
            "volumes": [{"name": "home", "persistentVolumeClaim": {"claimName": f"claim-{user}"}}],
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


@pytest.fixture
def cluster(
    tmp_path: Path, make_broker: Callable[..., BrokerProcess], unix_users: Any
) -> Iterator[tuple[Store, NodeAgent, BrokerProcess]]:
    need_module("kubernetes")
    need_module("kubespawner")
    # The agent runs worker pods only: the server pods stand for kernels run here.
    with (
        kube_api(tmp_path) as (store, kubeconfig),
        NodeAgent(store, selector="gpulane.test/none=none") as agent,
    ):
        store.put("nodes", "", gpu_node("gpu-1", 1))  # a one-slot cluster
        for user in (ALICE, BOB):
            store.put("pods", NAMESPACE, server_pod(user))
        broker = make_broker(
            "--gpu-source", "k8s", "--kubeconfig", str(kubeconfig),
            "--k8s-namespace", NAMESPACE, "--k8s-interval", "1s",
            "--worker-python", sys.executable, "--worker-node-selector",
            "nvidia.com/gpu.present=true", "--kill-grace", "5s",
        )  # fmt: skip
        yield store, agent, broker


def settle(broker: BrokerProcess, predicate: Callable[[], object], what: str) -> None:
    """wait_for, with the broker's log in the failure."""
    try:
        wait_for(predicate, 20, what=what)
    except AssertionError as error:
        raise AssertionError(f"{error}; the broker's log:\n{broker.log_text()[-4000:]}") from None


def kube_env(user: str) -> dict[str, str]:
    return {"GPULANE_BACKEND": "kubernetes", "GPULANE_CALLBACK_HOST": IPS[user]}


def workers(store: Store) -> list[dict[str, Any]]:
    return store.select("pods", NAMESPACE, "app.kubernetes.io/component=gpulane-worker")


def jobs(broker: BrokerProcess) -> dict[str, Any]:
    done = broker.call(None, "status", "--json")
    assert done.returncode == 0, done.stderr
    status: dict[str, Any] = json.loads(done.stdout)
    return status


def test_a_gpu_cell_runs_in_a_worker_pod_and_a_second_users_cell_waits_for_it(
    cluster: tuple[Store, NodeAgent, BrokerProcess], kernels: Any
) -> None:
    store, agent, broker = cluster
    alice = kernels(ALICE, broker, env=kube_env(ALICE))
    bob = kernels(BOB, broker, env=kube_env(BOB))
    assert alice.execute("base = 40\ndef bump(v):\n    return v + 2").status == "ok"
    first = alice.submit(
        "%%gpu --time 5m\n"
        "import os, time\n"
        "print('in pod, job', os.environ['GPULANE_JOB_ID'], flush=True)\n"
        "time.sleep(6)\n"
        "answer = bump(base)\n"
    )
    wait_for(lambda: agent.procs, 60, what="Alice's worker pod to run")
    [pod] = workers(store)
    labels = pod["metadata"]["labels"]
    assert (
        labels["gpulane.io/user"] == ALICE
        and labels["gpulane.io/job"] == labels["gpulane.io/lease"]
    )
    assert pod["metadata"]["ownerReferences"][0]["name"] == f"jupyter-{ALICE}"
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == f"claim-{ALICE}"
    key_name = pod["spec"]["volumes"][-1]["secret"]["secretName"]
    assert [s["metadata"]["name"] for s in store.select("secrets", NAMESPACE, "")] == [key_name]
    # Bob's cell queues behind Alice's on the one slot, and says who holds it.
    second = bob.submit("%%gpu --time 5m\nprint('bob in pod', flush=True)\nseen = 7\n")
    bob.wait_for_output(second, "position 1", timeout=30)
    assert len(workers(store)) == 1
    result = alice.collect(first, timeout=60)
    assert result.status == "ok", result.messages
    line = next(t for t, kind, c in result.messages if kind == "stream" and "in pod" in c["text"])
    assert result.messages[-1][0] - line > 2.0  # streamed while the cell still ran
    texts = "\n".join(result.texts())
    assert "worker pod: running on node gpu-1" in texts, texts
    assert alice.execute("print(answer)").stream().strip() == "42"
    # Bob's turn: his pod, after Alice's pod and Secret are gone.
    bobs = bob.collect(second, timeout=60)
    assert bobs.status == "ok", bobs.messages
    assert "bob in pod" in bobs.stream()
    assert bob.execute("print(seen)").stream().strip() == "7"
    assert len(agent.workers) == 2 and agent.workers[0] == pod["metadata"]["name"]
    wait_for(lambda: not workers(store) and not store.select("secrets", NAMESPACE, ""), 20,
             what="the worker pods and their Secrets to be deleted")  # fmt: skip
    ended = [j for j in store.events if j[2] == "pods" and j[1] == "DELETED"]
    assert len(ended) == 2


def test_interrupting_a_gpu_cell_deletes_its_pod_and_frees_the_gpu(
    cluster: tuple[Store, NodeAgent, BrokerProcess], kernels: Any
) -> None:
    store, agent, broker = cluster
    alice = kernels(ALICE, broker, env=kube_env(ALICE))
    assert alice.execute("keep = 'intact'").status == "ok"
    msg_id = alice.submit("%%gpu\nimport time\nprint('started', flush=True)\ntime.sleep(300)")
    alice.wait_for_output(msg_id, "started", timeout=60)
    [pod] = workers(store)
    alice.km.interrupt_kernel()
    result = alice.collect(msg_id, timeout=60)
    assert result.reply["ename"] == "KeyboardInterrupt"
    settle(broker, lambda: not workers(store), "the worker pod to be deleted")
    settle(broker, lambda: not store.select("secrets", NAMESPACE, ""), "its Secret deleted")
    settle(broker, lambda: not jobs(broker)["running"], "the GPU to be freed")
    assert pod["metadata"]["name"] not in agent.procs  # its process was stopped
    assert alice.execute("print(keep)").stream().strip() == "intact"


def test_a_kernel_that_dies_has_its_worker_pod_deleted(
    cluster: tuple[Store, NodeAgent, BrokerProcess], kernels: Any
) -> None:
    store, agent, broker = cluster
    alice = kernels(ALICE, broker, env=kube_env(ALICE))
    msg_id = alice.submit("%%gpu\nimport time\nprint('started', flush=True)\ntime.sleep(300)")
    alice.wait_for_output(msg_id, "started", timeout=60)
    [pod] = workers(store)
    os.kill(alice.pid, signal.SIGKILL)  # the kernel's process: its lease's client
    settle(broker, lambda: not workers(store), "the worker pod to be deleted")
    settle(broker, lambda: not store.select("secrets", NAMESPACE, ""), "its Secret deleted")
    settle(broker, lambda: not jobs(broker)["running"], "the GPU to be freed")
    assert pod["metadata"]["name"] not in agent.procs


def test_a_pod_kubernetes_cannot_start_shows_why_on_the_card(
    cluster: tuple[Store, NodeAgent, BrokerProcess], kernels: Any
) -> None:
    store, agent, broker = cluster
    notebook = server_pod(ALICE)["spec"]["containers"][0]
    unpullable = {**notebook, "image": "registry.example.org/lab/missing:1"}
    store.patch("pods", NAMESPACE, f"jupyter-{ALICE}", {"spec": {"containers": [unpullable]}})
    alice = kernels(ALICE, broker, env=kube_env(ALICE))
    msg_id = alice.submit("%%gpu\nprint('never')")
    alice.wait_for_output(
        msg_id, "worker pod: image pull failed on node gpu-1: image not found", timeout=60
    )
    assert [p["spec"]["containers"][0]["image"] for p in workers(store)] == [unpullable["image"]]
    alice.km.interrupt_kernel()
    assert alice.collect(msg_id, timeout=60).reply["ename"] == "KeyboardInterrupt"
    settle(broker, lambda: not workers(store) and not jobs(broker)["running"], "the GPU freed")
    assert not agent.procs


def test_a_gpu_session_keeps_one_worker_pod_for_its_cells(
    cluster: tuple[Store, NodeAgent, BrokerProcess], kernels: Any
) -> None:
    store, agent, broker = cluster
    alice = kernels(ALICE, broker, env=kube_env(ALICE))
    start = alice.execute("%gpu session start --idle 10m --time 5m", timeout=120)
    assert start.status == "ok", start.messages
    settle(broker, lambda: agent.procs, "the session's worker pod to run")
    assert alice.execute("%%gpu --session --no-return\nweights = [1]", timeout=60).status == "ok"
    second = alice.execute("%%gpu --session\nweights.append(2)\ncount = len(weights)", timeout=60)
    assert second.status == "ok", second.messages
    assert alice.execute("print(count)").stream().strip() == "2"
    assert len(agent.workers) == 1 and len(workers(store)) == 1  # one pod for the session
    assert alice.execute("%gpu session stop", timeout=60).status == "ok"
    settle(broker, lambda: not workers(store) and not jobs(broker)["running"], "the pod freed")


def test_a_worker_pod_that_never_starts_ends_its_job_with_the_reason(
    cluster: tuple[Store, NodeAgent, BrokerProcess],
    kernels: Any,
    make_broker: Callable[..., BrokerProcess],
) -> None:
    """No interrupt: past --worker-start-timeout the broker ends the job and frees the GPU."""
    store, agent, first = cluster
    kubeconfig = first.args[first.args.index("--kubeconfig") + 1]
    broker = make_broker(
        "--gpu-source", "k8s", "--kubeconfig", kubeconfig, "--k8s-namespace", NAMESPACE,
        "--k8s-interval", "1s", "--worker-python", sys.executable, "--worker-start-timeout", "12s",
    )  # fmt: skip
    notebook = server_pod(ALICE)["spec"]["containers"][0]
    unpullable = {**notebook, "image": "registry.example.org/lab/missing:2"}
    store.patch("pods", NAMESPACE, f"jupyter-{ALICE}", {"spec": {"containers": [unpullable]}})
    alice = kernels(ALICE, broker, env=kube_env(ALICE))
    result = alice.execute("%%gpu\nprint('never')", timeout=90)
    assert result.status == "error"
    texts = "\n".join(result.texts()) + json.dumps(result.reply)
    assert "its worker pod did not start within 00:12 (image pull failed on node gpu-1" in texts, (
        texts
    )
    settle(broker, lambda: not workers(store) and not jobs(broker)["running"], "the GPU freed")
    assert not agent.procs


# ---------------------------------------------------------------------------- attacks

ATTACK = """
import json, sys, time
from gpulane.jobs import Request
from gpulane.scheduler.kube import KubeCellScheduler
from gpulane.errors import SchedulerError

client = KubeCellScheduler()
job = client.submit(Request(gpus=1, time_limit=600, name="attack", command=("python3",)))
while client.job(job["id"])["state"] != "running":
    time.sleep(0.1)
answers = {}
for name, connect in json.loads(sys.argv[1]).items():
    try:
        client.start_worker(job["id"], connect, bytes(32))
        answers[name] = "created"
    except SchedulerError as error:
        answers[name] = str(error)
body = {"connect": sys.argv[2], "key": "00" * 32, "volumes": [{"name": "x"}]}
try:
    client.client.request("POST", f"/v1/jobs/{job['id']}/worker", body)
    answers["extra field"] = "created"
except SchedulerError as error:
    answers["extra field"] = str(error)
try:
    client.client.request("POST", f"/v1/jobs/{sys.argv[3]}/worker", {"connect": sys.argv[2], "key": "00" * 32})
    answers["another's job"] = "created"
except SchedulerError as error:
    answers["another's job"] = str(error)
try:
    client.cancel(int(sys.argv[3]))
    answers["cancel another's"] = "cancelled"
except SchedulerError as error:
    answers["cancel another's"] = str(error)
print(json.dumps(answers))
client.cancel(job["id"])
"""


def test_a_user_cannot_point_a_worker_at_another_kernel_nor_touch_anothers_pod(
    cluster: tuple[Store, NodeAgent, BrokerProcess], tmp_path: Path
) -> None:
    """Bob holds a grant and asks for a worker whose connect-back is Alice's kernel (her
    server pod's IP), a name, a loopback address; with extra fields in the body (another
    volume); for Alice's job; and to cancel Alice's job. Each is refused; nothing is made."""
    store, _, broker = cluster
    slices = gpu_node("gpu-1", 2)
    store.replace("nodes", "", "gpu-1", slices)  # room for Alice's job and Bob's at once
    wait_for(lambda: len(jobs(broker)["gpus"]) == 2, 20, what="the second GPU")
    listener = socket.create_server((IPS[ALICE], 0))  # Alice's "kernel", listening
    port = listener.getsockname()[1]
    env = user_env(ALICE, broker.socket)
    hers = subprocess.Popen(
        as_user(ALICE, [sys.executable, "-m", "gpulane", "run", "--", "sleep", "60"]),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: jobs(broker)["running"], 20, what="Alice's job to run")
        her_job = jobs(broker)["running"][0]["id"]
        tries = {
            "alice's kernel": f"{IPS[ALICE]}:{port}",
            "a host name": f"localhost:{port}",
            "loopback": f"127.0.0.1:{port}",
        }
        done = subprocess.run(
            as_user(
                BOB,
                [
                    sys.executable,
                    "-c",
                    ATTACK,
                    json.dumps(tries),
                    f"{IPS[BOB]}:40000",
                    str(her_job),
                ],
            ),
            env={**user_env(BOB, broker.socket), **kube_env(BOB)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        answers = json.loads(done.stdout.splitlines()[-1])
        assert "only to your own server pod" in answers["alice's kernel"]
        assert "the host must be an IP address" in answers["a host name"]
        assert "only to your own server pod" in answers["loopback"]
        assert "unknown field(s) in request: 'volumes'" in answers["extra field"]
        assert answers["another's job"] == f"no job {her_job}"
        assert answers["cancel another's"] == f"no job {her_job}"
        assert workers(store) == [] and store.select("secrets", NAMESPACE, "") == []
        assert hers.poll() is None  # Alice's job still runs
    finally:
        listener.close()
        hers.kill()
        hers.wait()
