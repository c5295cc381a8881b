"""GPU profiles on Kubernetes through a real JupyterHub: they queue at the broker, not in Pending.

The hub runs GpulaneKubeSpawner against the loopback Kubernetes API (the real
``kubernetes_asyncio`` client of KubeSpawner, the real ``kubernetes`` client of the
broker and of the pod keeper); its managed broker reads the cluster's one GPU from
the API. A test-side node agent runs each pod as a real ``jupyterhub-singleuser``
of the pod's user on a loopback address of its own, so the hub reaches the server
as it would reach a pod. (A CPU profile's plain pod is checked on KubeSpawner objects
in test_kubespawner_profiles.py, without a hub, to keep this file to one hub run.)
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpulane.broker.k8s_capacity import LEASE_LABEL
from tests.integration.test_local_profiles import PROFILES, progress_messages
from tests.support.hubclient import logged_in, server_ready
from tests.support.hubs import RunningHub, running_demo_hub
from tests.support.kube_agent import NodeAgent
from tests.support.kube_api import Store, gpu_node, kill_keepers, kube_api
from tests.support.users import need, need_module, wait_for

ADA, BEN = "gpl-demo-ada", "gpl-demo-ben"


@pytest.fixture(scope="module")
def kube_hub(
    unix_users: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningHub, Store, NodeAgent, Path]]:
    need_module("kubespawner")
    need_module("kubernetes")
    folder = tmp_path_factory.mktemp("kube")
    with kube_api(folder) as (store, kubeconfig), NodeAgent(store) as agent:
        store.put("nodes", "", gpu_node("gpu-1", 1))  # a one-slot cluster

        def config(state: Path) -> str:
            (state / "profiles.toml").write_text(PROFILES)
            return f"""
import os
os.environ["KUBECONFIG"] = {str(kubeconfig)!r}  # for KubeSpawner, the broker and keepers
from gpulane.hub.kube import configure_kubespawner
c.JupyterHub.spawner_class = "gpulane.hub.kube_spawner.GpulaneKubeSpawner"
configure_kubespawner(c, "{state}/profiles.toml")
c.GpulaneKubeSpawner.profiles_file = "{state}/profiles.toml"
c.GpulaneKubeSpawner.broker_socket = "{state}/run/broker.sock"
c.KubeSpawner.namespace = "jhub"
c.KubeSpawner.events_enabled = False  # the emulator keeps no Event objects
c.KubeSpawner.start_timeout = 60
c.KubeSpawner.http_timeout = 60
c.KubeSpawner.poll_interval = 5  # a server found without its lease is stopped soon
c.GpulaneHub.simulate_gpus = 0
c.GpulaneHub.gpu_source = "k8s"
c.GpulaneHub.k8s_namespace = "jhub"
c.JupyterHub.load_groups = {{"gpu-users": {{"users": ["{ADA}", "{BEN}"]}}}}
"""

        with running_demo_hub("gpulane-kube-", config) as hub:
            yield hub, store, agent, kubeconfig


def pods(store: Store) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in store.select("pods", "jhub", "")}


def wait_ready(user: Any, hub: RunningHub, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not server_ready(user):
        assert time.monotonic() < deadline, f"{what}: {hub.log_text()[-4000:]}"
        time.sleep(0.5)


def broker_jobs(hub: RunningHub) -> dict[int, dict[str, Any]]:
    import subprocess
    import sys

    status = subprocess.run(
        [sys.executable, "-m", "gpulane", "status", "--json"],
        env={"GPULANE_SOCKET": str(hub.state / "run" / "broker.sock"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    snapshot = json.loads(status.stdout)
    return {int(j["id"]): j for j in snapshot["running"] + snapshot["queue"]}


@pytest.mark.timeout(300)  # four hub starts and three spawns on a loaded machine
def test_gpu_servers_queue_their_pods_come_in_turn_and_leases_live_through_a_hub_restart(
    kube_hub: tuple[RunningHub, Store, NodeAgent, Path],
) -> None:
    from tests.faults.test_hub_restart import restart

    hub, store, agent, kubeconfig = kube_hub
    need("Kubernetes capacity: 1 nvidia.com/gpu on 1 node(s)" in hub.log_text(), "no k8s broker")
    ada, ben = logged_in(hub.url, hub.passwords, ADA), logged_in(hub.url, hub.passwords, BEN)
    try:
        assert ada.api("POST", f"/users/{ADA}/server", json={"profile": "gpu"}).status_code in (
            201,
            202,
        )
        wait_ready(ada, hub, "ada's GPU server never started")
        (ada_pod,) = pods(store).values()
        ada_job = int(ada_pod["metadata"]["labels"][LEASE_LABEL])
        env = {e["name"]: e.get("value") for e in ada_pod["spec"]["containers"][0]["env"]}
        assert env["GPULANE_JOB_ID"] == str(ada_job)
        assert ada_pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        # The broker took the hub's pod keeper as the lease's command (a child of its client).
        wait_for(lambda: "following the pod for its GPU lease" in hub.log_text(), 30, "keeper")
        assert not re.search(r"refused POST /v1/jobs/\d+/started", hub.log_text())

        # Ben asks for the GPU too: his spawn waits in the broker's queue, with no pod.
        assert ben.api("POST", f"/users/{BEN}/server", json={"profile": "gpu"}).status_code == 202
        messages = progress_messages(ben, "position 1 in the queue")
        assert f"GPU 0: {ADA}, running" in messages[-1], messages
        assert list(pods(store)) == [ada_pod["metadata"]["name"]]
        assert not server_ready(ben)

        # Ada's server stops (as culling does): its pod goes, its keeper ends the lease,
        # and only now is ben's pod created.
        assert ada.api("DELETE", f"/users/{ADA}/server").status_code in (202, 204)
        wait_ready(ben, hub, "ben's GPU server did not start after ada's stopped")
        (ben_pod,) = pods(store).values()
        assert ben_pod["metadata"]["name"] != ada_pod["metadata"]["name"]
        ben_job = int(ben_pod["metadata"]["labels"][LEASE_LABEL])
        jobs = broker_jobs(hub)
        assert ada_job not in jobs  # ended
        assert jobs[ben_job]["state"] == "running" and jobs[ben_job]["user"] == BEN
        assert agent.created == [ada_pod["metadata"]["name"], ben_pod["metadata"]["name"]]

        # The hub restarts (and its managed broker with it); the pod and its keeper do not,
        # and the broker's lease passes to the keeper.
        restart(hub)
        assert "its command (process" in hub.log_text() and f"job {ben_job}" in hub.log_text()
        assert broker_jobs(hub)[ben_job]["state"] == "running"
        wait_ready(ben, hub, "ben's server was lost in the hub restart")
        assert list(pods(store)) == [ben_pod["metadata"]["name"]]

        # The hub pod restarts: its keepers die with it, the pod lives on. The broker
        # starts a new keeper for ben's pod (its lease label and namespace are the hub's).
        restart(hub, while_down=lambda: need(kill_keepers(kubeconfig), "no keeper to kill"))
        wait_ready(ben, hub, "ben's server was lost in the hub pod restart")
        assert f"job {ben_job}: its pod jhub/{ben_pod['metadata']['name']} still runs" in (
            hub.log_text()
        )
        assert broker_jobs(hub)[ben_job]["state"] == "running"

        # Ben stops, through the new hub, which holds no thread on the lease: the end of
        # his pod ends its keeper, and the lease.
        assert ben.api("DELETE", f"/users/{BEN}/server").status_code in (202, 204)
        deadline = time.monotonic() + 30
        while ben_job in broker_jobs(hub):
            assert time.monotonic() < deadline, "ben's lease outlived his pod"
            time.sleep(0.3)
        assert pods(store) == {}

        # A server whose lease ended while the hub was down (here: its pod no longer bears
        # it, so the broker does not adopt it) is stopped by the new hub, its pod deleted.
        assert ada.api("POST", f"/users/{ADA}/server", json={"profile": "gpu"}).status_code in (
            201,
            202,
        )
        wait_ready(ada, hub, "ada's second GPU server never started")
        ((ada_name, _),) = pods(store).items()

        def lease_lost() -> None:
            need(kill_keepers(kubeconfig), "no keeper to kill")
            store.patch("pods", "jhub", ada_name, {"metadata": {"labels": {LEASE_LABEL: "0"}}})

        restart(hub, while_down=lease_lost)
        deadline = time.monotonic() + 60
        while pods(store):
            assert time.monotonic() < deadline, f"ada's pod outlived its lease: {hub.log_text()}"
            time.sleep(0.5)
        assert f"{ADA}'s GPU lease failed" in hub.log_text()
        wait_for(lambda: not server_ready(ada), 30, "the hub to see ada's server stopped")
    finally:
        for user in (ada, ben):
            user.api("DELETE", f"/users/{user.name}/server")
            user.close()
