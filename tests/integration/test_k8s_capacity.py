"""The broker's GPUs from a Kubernetes API: the loopback emulator, driven by the real client.

The emulator itself is tested first (create, get, list, patch, delete and watch of pods
and cluster-scoped nodes through ``kubernetes.client``), then the capacity the broker
reads from it: time-sliced slices, nodes that join, leave or go NotReady, and GPU pods
gpulane did not lease.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpulane.broker.k8s_capacity import LEASE_LABEL, KubeInventory, KubeReader, capacity
from gpulane.hub.config import GpulaneHub
from tests.support.kube_api import Store, gpu_node, kube_api
from tests.support.users import need_module


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[Store, Path, Any]]:
    kubernetes = need_module("kubernetes")
    with kube_api(tmp_path) as (store, kubeconfig):
        client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        yield store, kubeconfig, kubernetes.client.CoreV1Api(client)


def gpu_pod(name: str, node: str, gpus: int, labels: dict[str, str] | None = None) -> Any:
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "nodeName": node,
            "containers": [
                {"name": "c", "image": "x", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}
            ],
        },
    }


def test_the_emulator_keeps_pods_and_nodes_for_the_real_client(api: Any) -> None:
    _, _, core = api
    core.create_node(gpu_node("gpu-1", 4))
    assert core.read_node("gpu-1").status.allocatable == {"nvidia.com/gpu": "4"}
    core.create_namespaced_pod("jhub", gpu_pod("p", "gpu-1", 1, {"app": "jupyterhub"}))
    assert core.read_namespaced_pod("p", "jhub").status.phase == "Pending"
    core.patch_namespaced_pod_status("p", "jhub", {"status": {"phase": "Running"}})
    listed = core.list_pod_for_all_namespaces(label_selector="app=jupyterhub").items
    assert [(p.metadata.name, p.status.phase) for p in listed] == [("p", "Running")]
    assert core.list_namespaced_pod("other").items == []
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as conflict:
        core.create_namespaced_pod("jhub", gpu_pod("p", "gpu-1", 1))
    assert conflict.value.status == 409
    core.delete_namespaced_pod("p", "jhub")
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_pod("p", "jhub")
    assert missing.value.status == 404


def test_the_emulator_streams_watch_events_after_the_listing(api: Any) -> None:
    import threading

    from kubernetes import watch

    _, _, core = api
    core.create_namespaced_pod("jhub", gpu_pod("early", "gpu-1", 0))
    version = core.list_namespaced_pod("jhub").metadata.resource_version

    def later() -> None:
        time.sleep(0.3)
        core.create_namespaced_pod("jhub", gpu_pod("late", "gpu-1", 0))
        core.delete_namespaced_pod("late", "jhub")

    threading.Thread(target=later, daemon=True).start()
    seen = []
    for event in watch.Watch().stream(
        core.list_namespaced_pod, "jhub", resource_version=version, timeout_seconds=20
    ):
        seen.append((event["type"], event["object"].metadata.name))
        if len(seen) == 2:
            break
    assert seen == [("ADDED", "late"), ("DELETED", "late")]


def test_capacity_counts_slices_and_others_gpu_pods() -> None:
    nodes = [gpu_node("a", 8), gpu_node("b", 4), gpu_node("down", 4, ready=False)]
    nodes.append({**gpu_node("drained", 4), "spec": {"unschedulable": True}})
    running = {"status": {"phase": "Running"}}
    pods = [
        {**gpu_pod("other", "a", 2), **running},  # not gpulane's: counted against it
        {**gpu_pod("ours", "a", 1, {LEASE_LABEL: "7"}), **running},
        {**gpu_pod("done", "b", 1), "status": {"phase": "Succeeded"}},
        {**gpu_pod("elsewhere", "down", 4), **running},
    ]
    seen = capacity(nodes, pods)
    assert (seen.slices, seen.foreign, seen.nodes) == (12, 2, ("a", "b"))
    # Time-slicing with 4 replicas: 12 slices are 3 GPUs of 4; 10 free slices, 2 GPUs.
    assert seen.gpus(4) == 2
    assert seen.gpus(1) == 10


def test_the_inventory_follows_nodes_as_they_come_and_go(api: Any) -> None:
    store, kubeconfig, core = api
    core.create_node(gpu_node("gpu-1", 2))
    inventory = KubeInventory(KubeReader(str(kubeconfig)), 2, 16 * 1024**3, interval=0.2)
    try:
        assert inventory.count == 1
        core.create_node(gpu_node("gpu-2", 4))
        wait_for(lambda: inventory.count == 3)
        assert len(inventory.read()) == 3
        pod = {**gpu_pod("batch", "gpu-2", 2), "status": {"phase": "Running"}}
        core.create_namespaced_pod("default", pod)
        wait_for(lambda: inventory.count == 2)
        core.delete_node("gpu-1")
        wait_for(lambda: inventory.count == 1)
    finally:
        inventory.close()
    assert store.version > 0


def test_the_hub_option_starts_the_broker_on_the_clusters_gpus() -> None:
    hub = GpulaneHub(gpu_source="k8s", slices=4)
    command = hub.broker_command()
    assert command[command.index("--gpu-source") + 1] == "k8s"
    assert command[command.index("--slices") + 1] == "4"
    assert "--k8s-namespace" not in command  # the broker reads its service account's
    command = GpulaneHub(gpu_source="k8s", k8s_namespace="jhub").broker_command()
    assert command[command.index("--k8s-namespace") + 1] == "jhub"
    with pytest.raises(Exception, match="must be 'nvml' or 'k8s'"):
        GpulaneHub(gpu_source="slurm")


def wait_for(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_a_broker_process_plans_with_the_clusters_gpus(api: Any, make_broker: Any) -> None:
    import json

    _, kubeconfig, core = api
    core.create_node(gpu_node("gpu-1", 2))
    broker = make_broker("--gpu-source", "k8s", "--kubeconfig", str(kubeconfig), "--slices", "2")
    snapshot = json.loads(broker.call(None, "status", "--json").stdout)
    assert len(snapshot["gpus"]) == 1
    assert "Kubernetes capacity: 2 nvidia.com/gpu on 1 node(s)" in broker.log_text()


def test_a_node_that_joins_lets_a_queued_job_start(
    api: Any, make_broker: Any, tmp_path: Path
) -> None:
    import json

    _, kubeconfig, core = api
    core.create_node(gpu_node("gpu-1", 1))
    broker = make_broker(
        "--gpu-source", "k8s", "--kubeconfig", str(kubeconfig), "--k8s-interval", "1s"
    )

    def states() -> dict[str, str]:
        snapshot = json.loads(broker.call(None, "status", "--json").stdout)
        jobs = snapshot["running"] + snapshot["queue"]
        return {j["name"]: j["state"] for j in jobs}

    holder = broker.spawn(None, "run", "--name", "holder", "--", "sleep", "120")
    wait_for(lambda: states() == {"holder": "running"})
    waiting = broker.spawn(None, "run", "--name", "second", "--", "true")
    wait_for(lambda: states() == {"holder": "running", "second": "queued"})
    core.create_node(gpu_node("gpu-2", 1))
    # No job ended or arrived: the new node alone starts the second job.
    assert waiting.wait(timeout=30) == 0
    assert holder.poll() is None
    assert "Kubernetes capacity: 2 nvidia.com/gpu on 2 node(s)" in broker.log_text()


def test_status_says_when_nodes_disagree_with_time_slicing(api: Any, make_broker: Any) -> None:
    import json

    _, kubeconfig, core = api
    node = gpu_node("gpu-1", 2)  # GFD: 2 GPUs x 4 replicas; the plugin still advertises 2
    node["metadata"]["labels"].update({"nvidia.com/gpu.count": "2", "nvidia.com/gpu.replicas": "4"})
    core.create_node(node)
    broker = make_broker(
        "--gpu-source", "k8s", "--kubeconfig", str(kubeconfig), "--slices", "4",
        "--k8s-interval", "1s",
    )  # fmt: skip
    text = broker.call(None, "status").stdout
    assert (
        "capacity: node gpu-1 advertises 2 nvidia.com/gpu, but GPU feature discovery says "
        "2 GPU(s) x 4 replicas = 8: the device plugin has not applied its time-slicing config; restart it "
        "(kubectl -n gpu-operator rollout restart daemonset/nvidia-device-plugin-daemonset)"
    ) in text.splitlines()
    # The device plugin restarts: the line goes with the next reading.
    core.patch_node("gpu-1", {"status": {"allocatable": {"nvidia.com/gpu": "8"}}})

    def snapshot() -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(broker.call(None, "status", "--json").stdout)
        return loaded

    wait_for(lambda: "capacity_warning" not in snapshot())
    assert len(snapshot()["gpus"]) == 2
    assert "capacity:" not in broker.call(None, "status").stdout
