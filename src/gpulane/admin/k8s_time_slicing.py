"""NVIDIA time-slicing for the GPU Operator: the device plugin's ConfigMap and the ClusterPolicy patch.

Time-slicing makes the device plugin advertise each GPU as N ``nvidia.com/gpu``
(its *replicas*), so N pods can be placed on one card. The cards' compute is
then taken in turns; their memory is not divided (see docs/admin-kubernetes.md:
gpulane's slice profiles cap each framework at its share).

The ConfigMap holds two device-plugin configurations: ``sliced`` (the default for
every node) and ``whole`` (no sharing), so a node labelled
``nvidia.com/device-plugin.config=whole`` keeps exclusive GPUs. With
``rename_shared`` the sliced nodes advertise ``nvidia.com/gpu.shared`` instead,
so profiles can ask for a slice or a whole GPU without mixing them up.

``apply`` goes through the Kubernetes API and then reads the nodes back: a
node whose capacity did not change is reported by name, with what to check.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gpulane.broker.k8s_capacity import GPU_COUNT_LABEL, NodeGpus, node_gpus, restart_command

GPU_RESOURCE = "nvidia.com/gpu"
SHARED_RESOURCE = "nvidia.com/gpu.shared"
DEFAULT_NAMESPACE = "gpu-operator"
DEFAULT_CONFIGMAP = "time-slicing-config"
SLICED_KEY = "sliced"
WHOLE_KEY = "whole"
NODE_CONFIG_LABEL = "nvidia.com/device-plugin.config"
GPU_PRESENT_LABEL = "nvidia.com/gpu.present"
DEVICE_PLUGIN_SELECTOR = "app=nvidia-device-plugin-daemonset"
MAX_REPLICAS = 64


class K8sError(RuntimeError):
    """Something on the cluster is not as it should be; one line with what to do."""


class ApiRefused(K8sError):
    """The API answered with an error status (403: not allowed, 404: no such object)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TimeSlicing:
    """What to configure: ``replicas`` slices per GPU; None turns time-slicing off."""

    replicas: int | None
    namespace: str = DEFAULT_NAMESPACE
    configmap: str = DEFAULT_CONFIGMAP
    rename_shared: bool = False
    fail_requests_greater_than_one: bool = False

    def __post_init__(self) -> None:
        if self.replicas is not None and not 2 <= self.replicas <= MAX_REPLICAS:
            raise K8sError(
                f"--replicas {self.replicas} must be from 2 to {MAX_REPLICAS} "
                "(to turn time-slicing off, use --disable)"
            )

    @property
    def enabled(self) -> bool:
        return self.replicas is not None

    @property
    def resource(self) -> str:
        """The resource a slice is advertised as on sliced nodes."""
        return SHARED_RESOURCE if self.rename_shared and self.enabled else GPU_RESOURCE


# ---------------------------------------------------------------------------- manifests


def device_plugin_config(plan: TimeSlicing) -> dict[str, Any]:
    """The device plugin's configuration file for sliced nodes (MIG flags left to the operator)."""
    config: dict[str, Any] = {"version": "v1"}
    if plan.replicas is not None:
        config["sharing"] = {
            "timeSlicing": {
                "renameByDefault": plan.rename_shared,
                "failRequestsGreaterThanOne": plan.fail_requests_greater_than_one,
                "resources": [{"name": GPU_RESOURCE, "replicas": plan.replicas}],
            }
        }
    return config


def configmap(plan: TimeSlicing) -> dict[str, Any]:
    """The ConfigMap the GPU Operator's device plugin reads its configurations from."""
    import yaml

    whole = {"version": "v1"}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": plan.configmap,
            "namespace": plan.namespace,
            "labels": {"app.kubernetes.io/managed-by": "gpulane"},
        },
        "data": {
            SLICED_KEY: yaml.safe_dump(device_plugin_config(plan), sort_keys=False),
            WHOLE_KEY: yaml.safe_dump(whole, sort_keys=False),
        },
    }


def cluster_policy_patch(plan: TimeSlicing) -> dict[str, Any]:
    """A merge patch for the GPU Operator's ClusterPolicy: which ConfigMap, which default."""
    if not plan.enabled:  # null removes the key (JSON merge patch): the plugin's defaults
        return {"spec": {"devicePlugin": {"config": None}}}
    return {"spec": {"devicePlugin": {"config": {"name": plan.configmap, "default": SLICED_KEY}}}}


def render(plan: TimeSlicing) -> str:
    """What ``gpulane k8s time-slicing`` prints: the ConfigMap, then the remaining steps."""

    patch = json.dumps(cluster_policy_patch(plan), separators=(",", ":"))
    restart = (
        f"kubectl -n {plan.namespace} delete pod -l {DEVICE_PLUGIN_SELECTOR}  "
        "# the device plugin restarts with the new configuration"
    )
    escaped = plan.resource.replace(".", "\\.")
    check = (
        "kubectl get nodes -o custom-columns="
        "NAME:.metadata.name,GPUS:.metadata.labels.nvidia\\.com/gpu\\.count,"
        f"ADVERTISED:.status.capacity.{escaped}"
    )
    if not plan.enabled:
        return "\n".join(
            [
                "# Turn NVIDIA time-slicing off (gpulane k8s time-slicing --disable --apply does",
                "# all of this and checks the nodes afterwards):",
                "kubectl patch clusterpolicies.nvidia.com/cluster-policy --type merge \\",
                f"  -p '{patch}'",
                f"kubectl -n {plan.namespace} delete configmap {plan.configmap} --ignore-not-found",
                restart,
                f"{check}  # ADVERTISED should equal GPUS again",
                "",
            ]
        )
    per_gpu = f"{plan.replicas} × {plan.resource} per physical GPU"
    header = [
        f"# NVIDIA time-slicing: every GPU is advertised as {per_gpu}.",
        "# Compute is shared in turns; GPU memory is NOT divided and faults are not isolated",
        "# (gpulane's slice profiles cap each framework at its share of memory).",
        "#",
        "# 1. kubectl apply -f this-file.yaml",
        "# 2. point the GPU Operator at it:",
        "#    kubectl patch clusterpolicies.nvidia.com/cluster-policy --type merge \\",
        f"#      -p '{patch}'",
        f"# 3. {restart}",
        f"# 4. {check}",
        f"#    ADVERTISED should be GPUS × {plan.replicas}.",
        "# Or: gpulane k8s time-slicing ... --apply, which does 1-4 and checks every node.",
        f"# A node labelled {NODE_CONFIG_LABEL}={WHOLE_KEY} keeps whole GPUs.",
        "---",
    ]
    body = yaml_dump(configmap(plan))
    return "\n".join(header) + "\n" + body


def yaml_dump(data: Any) -> str:
    """YAML with multi-line strings as literal blocks (readable configs inside ConfigMaps)."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _string)
    text: str = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    return text


# ---------------------------------------------------------------------------- checking the nodes


@dataclass(frozen=True)
class NodeReport:
    """One GPU node under a plan: the broker's reading of it and what it should advertise."""

    seen: NodeGpus  # broker/k8s_capacity's reading: allocatable and GFD's labels
    expected: int | None  # None: the node does not say how many GPUs it has
    replicas: int  # what the plan asks of this node (1: whole GPUs)

    @property
    def name(self) -> str:
        return self.seen.name

    @property
    def resource(self) -> str:
        return self.seen.resource

    @property
    def actual(self) -> int:
        return self.seen.allocatable

    @property
    def ok(self) -> bool:
        return self.expected is None or self.actual == self.expected

    def line(self) -> str:
        if self.expected is None:
            return (
                f"{self.name}: allocatable {self.actual} {self.resource} (no {GPU_COUNT_LABEL} "
                "label to check against: is GPU Feature Discovery running?)"
            )
        if self.ok:
            return f"{self.name}: allocatable {self.actual} {self.resource}, as expected"
        return (
            f"{self.name}: allocatable {self.actual} {self.resource}, expected {self.expected} "
            f"({self.seen.physical} GPU(s) x {self.replicas})"
        )

    def cause(self, plan: TimeSlicing) -> str:
        """What to do about a node that does not advertise what it should."""
        if self.seen.replicas == self.replicas:  # GFD has the new config; the plugin does not
            return f"the device plugin has not restarted: {restart_command(plan.namespace)}"
        return (
            f"replicas not applied (GFD says {self.seen.replicas or 'none'}): check that the "
            f"ClusterPolicy's spec.devicePlugin.config names {plan.configmap!r} and the node's "
            f"{NODE_CONFIG_LABEL} label, then {restart_command(plan.namespace)}"
        )


def is_gpu_node(node: Mapping[str, Any]) -> bool:
    labels = node.get("metadata", {}).get("labels") or {}
    return (
        GPU_COUNT_LABEL in labels
        or labels.get(GPU_PRESENT_LABEL) == "true"
        or bool(node_gpus(node, GPU_RESOURCE).allocatable)
        or bool(node_gpus(node, SHARED_RESOURCE).allocatable)
    )


def expected_on(node: Mapping[str, Any], plan: TimeSlicing) -> NodeReport:
    """What one node should advertise under ``plan``, and what it does."""
    labels = node.get("metadata", {}).get("labels") or {}
    sliced = plan.enabled and labels.get(NODE_CONFIG_LABEL, SLICED_KEY) != WHOLE_KEY
    seen = node_gpus(node, plan.resource if sliced else GPU_RESOURCE)
    replicas = plan.replicas if sliced and plan.replicas else 1
    expected = seen.physical * replicas if seen.physical is not None else None
    return NodeReport(seen=seen, expected=expected, replicas=replicas)


def check_nodes(nodes: Iterable[Mapping[str, Any]], plan: TimeSlicing) -> list[NodeReport]:
    """A report for every GPU node; K8sError when the cluster has none."""
    reports = [expected_on(node, plan) for node in nodes if is_gpu_node(node)]
    if not reports:
        raise K8sError(
            "no node has NVIDIA GPUs (no nvidia.com/gpu capacity or GPU labels): "
            "is the NVIDIA GPU Operator installed and its pods running?"
        )
    return reports


def failure_message(reports: Sequence[NodeReport], plan: TimeSlicing, waited: float) -> str:
    bad = [r for r in reports if not r.ok]
    names = "; ".join(f"{r.line()}: {r.cause(plan)}" for r in bad)
    return (
        f"after {waited:.0f} s {len(bad)} node(s) do not advertise GPUs x replicas: {names}. "
        f"The device plugin's logs: kubectl -n {plan.namespace} logs -l "
        f"{DEVICE_PLUGIN_SELECTOR} --all-containers"
    )


# ---------------------------------------------------------------------------- applying


class Cluster(Protocol):
    """The few Kubernetes calls ``apply`` needs (KubeCluster makes them for real)."""

    def nodes(self) -> list[dict[str, Any]]: ...
    def put_configmap(self, manifest: dict[str, Any]) -> None: ...
    def delete_configmap(self, namespace: str, name: str) -> None: ...
    def cluster_policies(self) -> list[str]: ...
    def patch_cluster_policy(self, name: str, patch: dict[str, Any]) -> None: ...
    def restart_device_plugin(self, namespace: str) -> int: ...


def apply(
    plan: TimeSlicing,
    cluster: Cluster,
    *,
    wait: float = 180.0,
    poll: float = 5.0,
    say: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[NodeReport]:
    """Configure the cluster, restart the device plugin, wait for the nodes; K8sError if they do not follow."""
    policies = cluster.cluster_policies()
    if not policies:
        raise K8sError(
            "no ClusterPolicy (clusterpolicies.nvidia.com) found: install the NVIDIA GPU "
            "Operator first (helm install gpu-operator nvidia/gpu-operator -n gpu-operator)"
        )
    if plan.enabled:
        cluster.put_configmap(configmap(plan))
        say(f"ConfigMap {plan.namespace}/{plan.configmap}: {plan.replicas} replicas per GPU")
    for name in policies:
        cluster.patch_cluster_policy(name, cluster_policy_patch(plan))
        say(f"ClusterPolicy {name}: device plugin config " + ("set" if plan.enabled else "cleared"))
    if not plan.enabled:
        cluster.delete_configmap(plan.namespace, plan.configmap)
    restarted = cluster.restart_device_plugin(plan.namespace)
    say(f"restarted {restarted} device plugin pod(s); waiting up to {wait:.0f} s for the nodes")
    start = clock()
    while True:
        reports = check_nodes(cluster.nodes(), plan)
        waited = clock() - start
        if all(r.ok for r in reports) or waited >= wait:
            break
        sleep(min(poll, max(0.0, wait - waited)))
    for report in reports:
        say(report.line())
    if not all(r.ok for r in reports):
        raise K8sError(failure_message(reports, plan, waited))
    return reports


class KubeCluster:
    """:class:`Cluster` through the kubernetes Python client (kubeconfig, else in-cluster)."""

    def __init__(self, context: str | None = None, config_file: str | None = None) -> None:
        try:
            from kubernetes import client, config
        except ImportError:
            raise K8sError(
                "--apply needs the kubernetes client: pip install 'gpulane[k8s]'"
            ) from None
        loader: Any = config
        self.in_cluster = False  # a pod's service account (doctor asks for itself then)
        try:
            loader.load_kube_config(config_file=config_file, context=context)
        except Exception as kube_error:  # no kubeconfig: perhaps inside the cluster
            try:
                loader.load_incluster_config()
                self.in_cluster = True
            except Exception:
                raise K8sError(
                    f"no Kubernetes credentials: {kube_error} (set KUBECONFIG, or run in the cluster)"
                ) from None
        self.client: Any = client
        self.api_client: Any = client.ApiClient()
        self.core: Any = client.CoreV1Api(self.api_client)
        self.custom: Any = client.CustomObjectsApi(self.api_client)

    def call(self, what: str, call: Callable[[], Any], missing_ok: bool = False) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return call()
        except ApiException as error:
            if missing_ok and error.status == 404:
                return None
            detail = error.reason or ""
            with contextlib.suppress(ValueError, AttributeError):
                detail = json.loads(error.body or "{}").get("message", detail)
            raise ApiRefused(
                f"Kubernetes API refused to {what}: {error.status} {detail}", int(error.status or 0)
            ) from None
        except OSError as error:
            raise K8sError(f"cannot reach the Kubernetes API to {what}: {error}") from None
        except Exception as error:  # urllib3's errors are not OSErrors
            if type(error).__module__.startswith("urllib3"):
                raise K8sError(f"cannot reach the Kubernetes API to {what}: {error}") from None
            raise

    def nodes(self) -> list[dict[str, Any]]:
        result = self.call("list nodes", self.core.list_node)
        data = self.api_client.sanitize_for_serialization(result)
        return list(data.get("items") or [])

    def put_configmap(self, manifest: dict[str, Any]) -> None:
        metadata = manifest["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        body = self.client.V1ConfigMap(
            api_version="v1",
            kind="ConfigMap",
            metadata=self.client.V1ObjectMeta(
                name=name, namespace=namespace, labels=metadata.get("labels")
            ),
            data=manifest["data"],
        )
        existing = self.call(
            f"read ConfigMap {namespace}/{name}",
            lambda: self.core.read_namespaced_config_map(name, namespace),
            missing_ok=True,
        )
        if existing is None:
            self.call(
                f"create ConfigMap {namespace}/{name} (does namespace {namespace} exist?)",
                lambda: self.core.create_namespaced_config_map(namespace, body),
            )
        else:
            self.call(
                f"replace ConfigMap {namespace}/{name}",
                lambda: self.core.replace_namespaced_config_map(name, namespace, body),
            )

    def delete_configmap(self, namespace: str, name: str) -> None:
        self.call(
            f"delete ConfigMap {namespace}/{name}",
            lambda: self.core.delete_namespaced_config_map(name, namespace),
            missing_ok=True,
        )

    def cluster_policies(self) -> list[str]:
        listing = self.call(
            "list ClusterPolicies",
            lambda: self.custom.list_cluster_custom_object("nvidia.com", "v1", "clusterpolicies"),
            missing_ok=True,
        )
        items = (listing or {}).get("items") or []
        return [str(item["metadata"]["name"]) for item in items]

    def patch_cluster_policy(self, name: str, patch: dict[str, Any]) -> None:
        self.call(
            f"patch ClusterPolicy {name}",
            lambda: self.custom.patch_cluster_custom_object(
                "nvidia.com", "v1", "clusterpolicies", name, patch
            ),
        )

    def restart_device_plugin(self, namespace: str) -> int:
        pods = self.call(
            f"list device plugin pods in {namespace}",
            lambda: self.core.list_namespaced_pod(namespace, label_selector=DEVICE_PLUGIN_SELECTOR),
        )
        names: list[str] = [pod.metadata.name for pod in pods.items]
        for name in names:
            self._delete_pod(namespace, name)
        return len(names)

    def _delete_pod(self, namespace: str, name: str) -> None:
        self.call(
            f"restart device plugin pod {namespace}/{name}",
            lambda: self.core.delete_namespaced_pod(name, namespace),
            missing_ok=True,
        )
