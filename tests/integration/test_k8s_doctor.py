"""`gpulane doctor --k8s` and `gpulane k8s time-slicing --apply` against the loopback API.

The emulator's extension is tested first through the real client (ConfigMaps replaced,
apps/v1 DaemonSets, networking.k8s.io/v1 NetworkPolicies, the GPU Operator's
ClusterPolicies, /version, access reviews). A cluster set up as the GPU Operator and
``gpulane k8s hub-values`` leave it then passes every check; each fault an admin meets
(device plugin not restarted, RBAC not applied, no ConfigMap, no device plugin, no API,
the worker pods' policy missing or broader, the chart's values not applied) is its one
line and a non-zero exit. ``--apply`` runs against a test-side device
plugin that advertises GPUs x replicas only when its pods are restarted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpulane.admin.doctor.k8s import HUB_NEEDS
from gpulane.admin.k8s_network import chart_values, worker_policy
from gpulane.admin.k8s_time_slicing import TimeSlicing, configmap
from gpulane.cli import build_parser, dispatch
from tests.support.kube_api import SELF, Store, gpu_node, kube_api
from tests.support.netpol import chart_pod, chart_policies
from tests.support.users import need_module

HUB = "system:serviceaccount:jhub:hub"
PLUGIN_LABELS = {"app": "nvidia-device-plugin-daemonset"}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[Store, Path, Any]]:
    kubernetes = need_module("kubernetes")
    with kube_api(tmp_path) as (store, kubeconfig):
        client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        yield store, kubeconfig, client


def gfd_node(name: str, gpus: int, replicas: int, advertised: int) -> dict[str, Any]:
    node = gpu_node(name, advertised)
    labels = {"nvidia.com/gpu.count": str(gpus), "nvidia.com/gpu.replicas": str(replicas)}
    node["metadata"]["labels"].update(labels)
    return node


def daemonset(name: str, ready: int, desired: int = 2) -> dict[str, Any]:
    """A DaemonSet as the real client reads it back (selector and template are required)."""
    container = {"name": "plugin", "image": "nvcr.io/nvidia/k8s-device-plugin"}
    return {
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": PLUGIN_LABELS},
            "template": {
                "metadata": {"labels": PLUGIN_LABELS},
                "spec": {"containers": [container]},
            },
        },
        "status": {
            "desiredNumberScheduled": desired,
            "numberReady": ready,
            "currentNumberScheduled": desired,
            "numberMisscheduled": 0,
        },
    }


def operator(store: Store, replicas: int | None = 4, plugin_ready: int = 2) -> None:
    """What the GPU Operator leaves: its ClusterPolicy, the device plugin, two GPU nodes."""
    policy: dict[str, Any] = {"metadata": {"name": "cluster-policy"}, "spec": {}}
    if replicas:
        store.put("configmaps", "gpu-operator", configmap(TimeSlicing(replicas=replicas)))
        policy["spec"] = {"devicePlugin": {"config": {"name": "time-slicing-config"}}}
    store.put("clusterpolicies", "", policy)
    store.put(
        "daemonsets", "gpu-operator", daemonset("nvidia-device-plugin-daemonset", plugin_ready)
    )
    for name in ("gpu-1", "gpu-2"):
        r = replicas or 1
        store.put("nodes", "", gfd_node(name, 2, r, 2 * r))
    store.grants[HUB] = {(verb, resource) for verb, resource, _ in HUB_NEEDS}
    network(store)


def network(store: Store, values: dict[str, Any] | None = None, workers: bool = True) -> None:
    """The hub's namespace as the chart leaves it with hub-values' values (its hub and
    proxy pods, its policies with gpulane's rules) and gpulane-rbac.yaml's worker policy."""
    for _, namespace, name in [k for k in store.objects if k[0] == "networkpolicies"]:
        store.delete("networkpolicies", namespace, name)
    for policy in chart_policies(chart_values() if values is None else values):
        store.put("networkpolicies", "jhub", policy)
    if workers:
        store.put("networkpolicies", "jhub", worker_policy("jhub"))
    if ("services", "jhub", "hub") not in store.objects:
        ports = [{"name": "hub", "port": 8081, "targetPort": "http"}]
        ports += (
            (values if values is not None else chart_values())
            .get("hub", {})
            .get("service", {})
            .get("extraPorts", [])
        )
        store.put("services", "jhub", {"metadata": {"name": "hub"}, "spec": {"ports": ports}})
    for pod in (
        chart_pod("hub-5d9c", "hub", "10.0.0.2", {}),
        chart_pod(
            "proxy-77f1", "proxy", "10.0.0.3", {"hub.jupyter.org/network-access-hub": "true"}
        ),
    ):
        key = ("pods", "jhub", pod.name)
        if key not in store.objects:
            metadata = {"name": pod.name, "labels": dict(pod.labels)}
            store.put("pods", "jhub", {"metadata": metadata, "status": {"podIP": pod.ip}})


def doctor(
    kubeconfig: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, dict[str, str]]:
    """Run ``gpulane doctor --k8s`` in process: its exit status and, per check, "status message"."""
    import json

    argv = ["doctor", "--k8s", "--json", "--kubeconfig", str(kubeconfig), *extra]
    status = dispatch(build_parser().parse_args(argv))
    findings = json.loads(capsys.readouterr().out)["findings"]
    return status, {f["name"]: f"{f['status']} {f['message']}" for f in findings}


def test_the_report_is_one_line_per_check(api: Any, capsys: pytest.CaptureFixture[str]) -> None:
    store, kubeconfig, _ = api
    operator(store)
    status = dispatch(
        build_parser().parse_args(["doctor", "--k8s", "--kubeconfig", str(kubeconfig)])
    )
    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert [line.split()[0] for line in lines[:-1] if not line.startswith(" ")] == (
        ["ok"] * 7 + ["INFO"]
    )
    assert lines[-1] == "0 failed, 0 warning(s), 7 ok, 1 noted"


def test_the_emulator_serves_what_doctor_and_apply_use(api: Any) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    store, _, api_client = api
    core = client.CoreV1Api(api_client)
    manifest = configmap(TimeSlicing(replicas=4))
    body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="ts"), data=manifest["data"])
    core.create_namespaced_config_map("gpu-operator", body)
    body.data = {"sliced": "changed"}
    core.replace_namespaced_config_map("ts", "gpu-operator", body)
    assert core.read_namespaced_config_map("ts", "gpu-operator").data == {"sliced": "changed"}
    apps = client.AppsV1Api(api_client)
    store.put("daemonsets", "gpu-operator", daemonset("d", 1))
    assert apps.read_namespaced_daemon_set("d", "gpu-operator").metadata.name == "d"
    import urllib.error
    import urllib.request

    host = api_client.configuration.host
    with pytest.raises(urllib.error.HTTPError) as wrong_group:  # a DaemonSet is not core/v1
        urllib.request.urlopen(f"{host}/api/v1/namespaces/gpu-operator/daemonsets/d", timeout=10)
    assert wrong_group.value.code == 404
    wrong_group.value.close()
    custom = client.CustomObjectsApi(api_client)
    store.put("clusterpolicies", "", {"metadata": {"name": "cp"}, "spec": {}})
    custom.patch_cluster_custom_object(
        "nvidia.com", "v1", "clusterpolicies", "cp", {"spec": {"devicePlugin": {"x": 1}}}
    )
    listed = custom.list_cluster_custom_object("nvidia.com", "v1", "clusterpolicies")["items"]
    assert listed[0]["spec"] == {"devicePlugin": {"x": 1}}
    assert client.VersionApi(api_client).get_code().git_version == "v1.30.0-loopback"
    networking = client.NetworkingV1Api(api_client)
    networking.create_namespaced_network_policy("jhub", worker_policy("jhub"))
    (listed_policy,) = networking.list_namespaced_network_policy("jhub").items
    assert listed_policy.spec.pod_selector.match_labels == {
        "app.kubernetes.io/component": "gpulane-worker"
    }
    assert networking.read_namespaced_network_policy("gpulane-workers", "jhub").spec.ingress == []
    assert networking.list_namespaced_network_policy("other").items == []
    with pytest.raises(urllib.error.HTTPError) as core_group:  # not core/v1 either
        urllib.request.urlopen(f"{host}/api/v1/namespaces/jhub/networkpolicies", timeout=10)
    assert core_group.value.code == 404
    core_group.value.close()
    auth = client.AuthorizationV1Api(api_client)
    store.grants[HUB] = {("list", "nodes")}

    def may(verb: str, resource: str) -> bool:
        attributes = client.V1ResourceAttributes(verb=verb, resource=resource)
        spec = client.V1SubjectAccessReviewSpec(user=HUB, resource_attributes=attributes)
        review = auth.create_subject_access_review(client.V1SubjectAccessReview(spec=spec))
        return bool(review.status.allowed)

    assert may("list", "nodes") and not may("list", "pods") and not may("delete", "nodes")
    attributes = client.V1ResourceAttributes(verb="delete", resource="pods")
    mine = client.V1SelfSubjectAccessReview(
        spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=attributes)
    )
    assert auth.create_self_subject_access_review(mine).status.allowed  # SELF may do anything
    store.grants[SELF] = {("list", "nodes")}
    with pytest.raises(ApiException) as forbidden:  # may not ask about others now
        may("list", "nodes")
    assert forbidden.value.status == 403


def test_doctor_passes_on_a_cluster_set_up_as_the_checklist_says(
    api: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    store, kubeconfig, _ = api
    operator(store)
    status, lines = doctor(kubeconfig, capsys)
    assert status == 0, lines
    assert lines["api"].startswith("ok http://127.0.0.1:") and "v1.30.0-loopback" in lines["api"]
    assert lines["hub access"] == (
        "ok service account jhub/hub may list nodes and pods; in jhub create, get, list, watch "
        "and delete pods and secrets, read events"
    )
    assert lines["gpu nodes"] == (
        "ok 2 GPU node(s) advertise GPUs x replicas: gpu-1 8 nvidia.com/gpu (2 GPU(s) x 4), "
        "gpu-2 8 nvidia.com/gpu (2 GPU(s) x 4)"
    )
    assert lines["device plugin"] == (
        "ok GPU Operator (ClusterPolicy cluster-policy), device plugin 2/2 ready"
    )
    assert lines["time-slicing"] == (
        "ok ConfigMap gpu-operator/time-slicing-config: 4 replicas per GPU, used by cluster-policy"
    )
    assert lines["network policy"] == (
        "ok as jhub's 4 NetworkPolicies read: %%gpu workers reach user pods on 32768-60999 "
        "and DNS only, nothing reaches them; kernels reach the broker's API on 9874, the "
        "proxy the dashboard on 9873"
    )
    assert lines["dashboard"] == (
        "ok Service jhub/hub has port 9873: the proxy sends /services/gpulane/ to the "
        "dashboard in the hub pod; and port 9874: kernels reach the broker's API "
        "(GPULANE_BROKER_URL)"
    )
    assert lines["not checked"].startswith("info doctor reads the API, not the network: that ")


def test_doctor_finds_the_dashboards_port_missing(
    api: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    store, kubeconfig, _ = api
    operator(store)
    store.delete("services", "jhub", "hub")
    store.put(
        "services",
        "jhub",
        {"metadata": {"name": "hub"}, "spec": {"ports": [{"name": "hub", "port": 8081}]}},
    )
    status, lines = doctor(kubeconfig, capsys)
    assert status == 1
    assert lines["dashboard"] == (
        "fail Service jhub/hub has no port 9873 (ports 8081): the proxy cannot reach the "
        "dashboard; no port 9874 (ports 8081): kernels in user pods cannot reach the broker's API"
    )
    # The dashboard's port alone (values from before the API had its own port).
    store.delete("services", "jhub", "hub")
    only = [{"name": "hub", "port": 8081}, {"name": "gpulane", "port": 9873}]
    store.put("services", "jhub", {"metadata": {"name": "hub"}, "spec": {"ports": only}})
    status, lines = doctor(kubeconfig, capsys)
    assert status == 1
    assert lines["dashboard"] == (
        "fail Service jhub/hub has no port 9874 (ports 8081, 9873): kernels in user pods "
        "cannot reach the broker's API"
    )
    store.delete("services", "jhub", "hub")
    status, lines = doctor(kubeconfig, capsys)
    assert lines["dashboard"].startswith("fail no Service jhub/hub: is the hub installed here")


def test_doctor_reads_what_the_network_policies_mean(
    api: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    store, kubeconfig, _ = api
    operator(store)
    network(store, workers=False)
    status, lines = doctor(kubeconfig, capsys)
    assert status == 1
    assert lines["network policy"].startswith(
        "fail no NetworkPolicy jhub/gpulane-workers: %%gpu worker pods (users' code on GPU nodes)"
    )
    # The chart's policies without gpulane's values: user pods refuse workers, the hub kernels.
    network(store, values={})
    status, lines = doctor(kubeconfig, capsys)
    assert status == 1
    assert lines["network policy"] == (
        "fail the NetworkPolicies in jhub would not let a worker reach its kernel on port 32768 "
        "(and 3 more)"
    )
    # A worker policy broadened by hand (egress anywhere): doctor says what it now lets through.
    network(store)
    broad = worker_policy("jhub")
    broad["spec"]["egress"].append({})
    store.replace("networkpolicies", "jhub", "gpulane-workers", broad)
    status, lines = doctor(kubeconfig, capsys)
    assert status == 1
    assert lines["network policy"] == (
        "fail the NetworkPolicies in jhub would let a worker reach a user's Jupyter server "
        "(8888) (and 1 more)"  # the internet; the hub still refuses it
    )
    # One that lets anyone in: user pods' own egress still stops them, the hub's does not.
    network(store)
    open_door = worker_policy("jhub")
    open_door["spec"]["ingress"] = [{}]
    store.replace("networkpolicies", "jhub", "gpulane-workers", open_door)
    status, lines = doctor(kubeconfig, capsys)
    assert status == 1
    assert lines["network policy"] == (
        "fail the NetworkPolicies in jhub would let the hub pod reach a worker"
    )


def test_doctor_names_each_fault_and_fails(api: Any, capsys: pytest.CaptureFixture[str]) -> None:
    store, kubeconfig, _ = api
    operator(store, plugin_ready=1)
    store.patch("nodes", "", "gpu-2", {"status": {"allocatable": {"nvidia.com/gpu": "2"}}})
    store.grants[HUB] = {("list", "nodes")}
    store.delete("configmaps", "gpu-operator", "time-slicing-config")
    status, lines = doctor(kubeconfig, capsys)
    assert status == 1
    assert lines["gpu nodes"] == (
        "fail node gpu-2 advertises 2 nvidia.com/gpu, but GPU feature discovery says 2 GPU(s) "
        "x 4 replicas = 8: the device plugin has not applied its time-slicing config; restart it "
        "(kubectl -n gpu-operator rollout restart daemonset/nvidia-device-plugin-daemonset)"
    )
    assert lines["hub access"].startswith(
        "fail service account jhub/hub may not list pods, create pods in jhub, get pods in jhub"
    )
    assert "create secrets in jhub" in lines["hub access"]
    assert lines["device plugin"] == "fail 1 of 2 device plugin pod(s) ready"
    assert lines["time-slicing"] == (
        "warn no ConfigMap gpu-operator/time-slicing-config: GPUs are not time-sliced"
    )
    # A profile file with 2 slices per GPU: the nodes' 4 replicas disagree with the broker.
    store.patch("nodes", "", "gpu-2", {"status": {"allocatable": {"nvidia.com/gpu": "8"}}})
    profiles = Path(kubeconfig).with_name("profiles.toml")
    example = Path(__file__).resolve().parents[2] / "examples" / "profiles.toml"
    profiles.write_text(example.read_text().replace("slices_per_gpu = 4", "slices_per_gpu = 2"))
    status, lines = doctor(kubeconfig, capsys, "--profiles", str(profiles))
    assert status == 1
    assert lines["gpu nodes"].startswith(
        "fail node gpu-1 slices each GPU 4 way(s) but the broker counts 2 slice(s) per GPU"
    )


def test_doctor_without_the_operator_or_an_api(
    api: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    store, kubeconfig, _ = api
    store.grants[SELF] = {("get", "nodes")}  # may not ask about the hub's account
    status, lines = doctor(kubeconfig, capsys)
    assert status == 1
    assert lines["gpu nodes"].startswith("fail no node has NVIDIA GPUs")
    assert lines["device plugin"] == (
        "fail no ClusterPolicy: the NVIDIA GPU Operator is not installed"
    )
    assert lines["hub access"].startswith("warn cannot ask what service account jhub/hub")
    dead = tmp_path / "dead"  # the same kubeconfig, on a port nothing listens on
    port = kubeconfig.read_text().split("127.0.0.1:")[1].split('"')[0]
    dead.write_text(kubeconfig.read_text().replace(f"127.0.0.1:{port}", "127.0.0.1:9"))
    status, lines = doctor(dead, capsys)
    assert status == 1
    assert lines["api"].startswith("fail cannot reach the Kubernetes API")
    assert lines["gpu nodes"].startswith("warn not checked: the Kubernetes API is not reachable")


class DevicePlugin:
    """Test-side GPU Operator: when its pods are deleted, GFD relabels each node with the
    ConfigMap's replicas and, unless stuck, the new plugin advertises GPUs x replicas."""

    def __init__(self, store: Store, stuck: bool = False) -> None:
        self.store, self.stuck = store, stuck
        self.stop = threading.Event()
        self.store.put(
            "pods", "gpu-operator", {"metadata": {"name": "dp-1", "labels": PLUGIN_LABELS}}
        )
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def replicas(self) -> int:
        import yaml

        found = self.store.select("configmaps", "gpu-operator", "")
        if not found:
            return 1
        config = yaml.safe_load(found[0]["data"]["sliced"])
        return int(config["sharing"]["timeSlicing"]["resources"][0]["replicas"])

    def run(self) -> None:
        while not self.stop.wait(0.05):
            if self.store.select("pods", "gpu-operator", "app=nvidia-device-plugin-daemonset"):
                continue
            replicas = self.replicas()
            for node in self.store.select("nodes", None, ""):
                gpus = int(node["metadata"]["labels"]["nvidia.com/gpu.count"])
                patch: dict[str, Any] = {
                    "metadata": {"labels": {"nvidia.com/gpu.replicas": str(replicas)}}
                }
                if not self.stuck:
                    patch["status"] = {"allocatable": {"nvidia.com/gpu": str(gpus * replicas)}}
                self.store.patch("nodes", "", node["metadata"]["name"], patch)
            self.store.put(
                "pods", "gpu-operator", {"metadata": {"name": "dp-2", "labels": PLUGIN_LABELS}}
            )


@pytest.mark.parametrize("stuck", [False, True])
def test_apply_then_checks_the_nodes_the_broker_reads(
    api: Any, capsys: pytest.CaptureFixture[str], stuck: bool
) -> None:
    store, kubeconfig, _ = api
    store.put("clusterpolicies", "", {"metadata": {"name": "cluster-policy"}, "spec": {}})
    store.put("nodes", "", gfd_node("gpu-1", 2, 1, 2))
    plugin = DevicePlugin(store, stuck=stuck)
    try:
        start = time.monotonic()
        args = build_parser().parse_args(
            ["k8s", "time-slicing", "--replicas", "4", "--apply", "--wait", "3",
             "--kubeconfig", str(kubeconfig)]
        )  # fmt: skip
        status = dispatch(args)
        out, err = capsys.readouterr()
    finally:
        plugin.stop.set()
    assert time.monotonic() - start < 30
    policy = store.select("clusterpolicies", None, "")[0]
    assert policy["spec"]["devicePlugin"]["config"] == {
        "name": "time-slicing-config",
        "default": "sliced",
    }
    if not stuck:
        assert status == 0, err
        assert "gpu-1: allocatable 8 nvidia.com/gpu, as expected" in out.splitlines()
        return
    assert status == 1
    assert "gpu-1: allocatable 2 nvidia.com/gpu, expected 8 (2 GPU(s) x 4)" in out.splitlines()
    assert len(err.strip().splitlines()) == 1
    assert (
        "the device plugin has not restarted: kubectl -n gpu-operator rollout restart "
        "daemonset/nvidia-device-plugin-daemonset" in err
    )


@pytest.mark.parametrize("name", ["k8s", "kubernetes"])
def test_backend_k8s_points_at_the_k8s_checks(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # --backend names what runs GPU jobs on this machine; a cluster's checks are --k8s.
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["doctor", "--backend", name])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"'{name}' is not a --backend here" in err and "gpulane doctor --k8s" in err
    assert len(err.strip().splitlines()) == 1
    assert build_parser().parse_args(["doctor", "--backend", "slurm"]).backend == "slurm"
