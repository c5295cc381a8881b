"""``gpulane doctor --k8s``: docs/admin-kubernetes.md's checklist, against the cluster of the
current kubeconfig (or the pod's service account, run inside the hub pod).

Each check is a function of a :class:`KubeSite` returning one Finding, as the Slurm and
broker checks do. The nodes are judged with the broker's own reading
(:func:`gpulane.broker.k8s_capacity.node_gpus`, :func:`~gpulane.broker.k8s_capacity.node_mismatch`),
so doctor, ``gpulane status`` and ``time-slicing --apply`` say the same thing about them.
Only reads are made (and access reviews, which change nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpulane.admin.doctor.context import Finding, run_each
from gpulane.admin.doctor.k8s_workers import (
    check_dashboard,
    check_network_policy,
    check_unseen,
)
from gpulane.admin.k8s_network import WORKER_NEEDS
from gpulane.admin.k8s_time_slicing import (
    DEFAULT_CONFIGMAP,
    DEFAULT_NAMESPACE,
    GPU_RESOURCE,
    NODE_CONFIG_LABEL,
    SLICED_KEY,
    WHOLE_KEY,
    ApiRefused,
    K8sError,
    KubeCluster,
    is_gpu_node,
)
from gpulane.broker.k8s_capacity import (
    DEVICE_PLUGIN_DAEMONSET,
    GPU_COUNT_LABEL,
    NodeGpus,
    node_gpus,
    node_mismatch,
    restart_command,
)

TIMEOUT_S = 10.0
SKIPPED = "not checked: the Kubernetes API is not reachable (see 'api')"
# What the hub pod does with its service account: the broker lists nodes and pods in every
# namespace (hub-values' ClusterRole); the pod keeper watches and deletes user pods in the
# hub's namespace, and the broker creates, follows and deletes %%gpu worker pods, their
# Secrets and reads their events there (the chart's own Role). None: cluster-wide; "hub":
# the hub's namespace.
HUB_NEEDS: tuple[tuple[str, str, str | None], ...] = (
    ("list", "nodes", None),
    ("list", "pods", None),
    *((verb, resource, "hub") for verb, resource in WORKER_NEEDS),
)


@dataclass
class KubeSite:
    """Which cluster, and where the GPU Operator and the hub live in it."""

    kubeconfig: str | None = None
    context: str | None = None
    operator_namespace: str = DEFAULT_NAMESPACE
    configmap: str = DEFAULT_CONFIGMAP
    hub_namespace: str = "jhub"
    hub_service_account: str = "hub"
    resource: str = GPU_RESOURCE  # what the broker counts (nvidia.com/gpu.shared: renamed)
    slices: int | None = None  # the broker's slices per GPU, where known (--profiles)
    timeout: float = TIMEOUT_S
    cache: dict[str, Any] = field(default_factory=dict)

    def cluster(self) -> KubeCluster:
        """The client, made once; K8sError if there are no credentials."""
        if "cluster" not in self.cache:
            self.cache["cluster"] = KubeCluster(self.context, self.kubeconfig)
        cluster: KubeCluster = self.cache["cluster"]
        return cluster

    def reachable(self) -> bool:
        return self.cache.get("api_ok") is True

    def nodes(self) -> list[dict[str, Any]]:
        if "nodes" not in self.cache:
            cluster = self.cluster()
            listing = cluster.call(
                "list nodes", lambda: cluster.core.list_node(_request_timeout=self.timeout)
            )
            data = cluster.api_client.sanitize_for_serialization(listing)
            self.cache["nodes"] = list(data.get("items") or [])
        nodes: list[dict[str, Any]] = self.cache["nodes"]
        return nodes

    def cluster_policies(self) -> list[dict[str, Any]] | None:
        """The GPU Operator's ClusterPolicies; None where its CRD is not installed."""
        if "policies" not in self.cache:
            cluster = self.cluster()
            listing = cluster.call(
                "list ClusterPolicies",
                lambda: cluster.custom.list_cluster_custom_object(
                    "nvidia.com", "v1", "clusterpolicies", _request_timeout=self.timeout
                ),
                missing_ok=True,
            )
            self.cache["policies"] = None if listing is None else list(listing.get("items") or [])
        policies: list[dict[str, Any]] | None = self.cache["policies"]
        return policies


def check_api(site: KubeSite) -> Finding:
    fix = "kubectl cluster-info; pick the cluster with --kubeconfig FILE / --context NAME"
    try:
        cluster = site.cluster()
        from kubernetes import client

        version = cluster.call(
            "read its version",
            lambda: client.VersionApi(cluster.api_client).get_code(_request_timeout=site.timeout),
        )
    except K8sError as error:
        return Finding("api", "fail", str(error), fix)
    site.cache["api_ok"] = True
    host = cluster.api_client.configuration.host
    where = "this pod's service account" if cluster.in_cluster else "the kubeconfig"
    return Finding("api", "ok", f"{host} answers ({version.git_version}), as {where}")


def _review(site: KubeSite, verb: str, resource: str, namespace: str | None) -> bool:
    """May the hub's service account do this? (a self review where we are it)"""
    cluster = site.cluster()
    attributes = cluster.client.V1ResourceAttributes(
        verb=verb, resource=resource, namespace=namespace
    )
    if cluster.in_cluster:
        body: Any = cluster.client.V1SelfSubjectAccessReview(
            spec=cluster.client.V1SelfSubjectAccessReviewSpec(resource_attributes=attributes)
        )
        create: Callable[[], Any] = lambda: cluster.client.AuthorizationV1Api(  # noqa: E731
            cluster.api_client
        ).create_self_subject_access_review(body, _request_timeout=site.timeout)
    else:
        user = f"system:serviceaccount:{site.hub_namespace}:{site.hub_service_account}"
        body = cluster.client.V1SubjectAccessReview(
            spec=cluster.client.V1SubjectAccessReviewSpec(user=user, resource_attributes=attributes)
        )
        create = lambda: cluster.client.AuthorizationV1Api(  # noqa: E731
            cluster.api_client
        ).create_subject_access_review(body, _request_timeout=site.timeout)
    answer = cluster.call(f"review whether the hub may {verb} {resource}", create)
    return bool(answer.status.allowed)


def check_hub_access(site: KubeSite) -> Finding:
    name = "hub access"
    if not site.reachable():
        return Finding(name, "warn", SKIPPED)
    account = f"{site.hub_namespace}/{site.hub_service_account}"
    try:
        denied = []
        for verb, resource, where in HUB_NEEDS:
            namespace = site.hub_namespace if where else None
            if not _review(site, verb, resource, namespace):
                denied.append(f"{verb} {resource}" + (f" in {namespace}" if namespace else ""))
    except ApiRefused as error:
        if error.status != 403:
            return Finding(name, "fail", str(error))
        return Finding(
            name,
            "warn",
            f"cannot ask what service account {account} may do (this kubeconfig may not "
            "create subjectaccessreviews)",
            f"run it in the hub pod: kubectl -n {site.hub_namespace} exec deploy/hub -- "
            "gpulane doctor --k8s",
        )
    except K8sError as error:
        return Finding(name, "fail", str(error))
    if denied:
        return Finding(
            name,
            "fail",
            f"service account {account} may not {', '.join(denied)}: the broker in the hub "
            "pod cannot read the cluster's GPUs, follow its GPU servers' pods or start "
            "%%gpu worker pods",
            "kubectl apply -f gpulane-rbac.yaml (written by gpulane k8s hub-values --rbac-out); "
            "pods, secrets and events in the hub's namespace come with z2jh's hub Role "
            "(rbac.create: true)",
        )
    return Finding(
        name,
        "ok",
        f"service account {account} may list nodes and pods; in {site.hub_namespace} create, "
        "get, list, watch and delete pods and secrets, read events",
    )


def _describe(node: NodeGpus) -> str:
    split = f" ({node.physical} GPU(s) x {node.replicas})" if node.expected is not None else ""
    return f"{node.name} {node.allocatable} {node.resource}{split}"


def check_gpu_nodes(site: KubeSite) -> Finding:
    name = "gpu nodes"
    if not site.reachable():
        return Finding(name, "warn", SKIPPED)
    try:
        nodes = [node_gpus(n, site.resource) for n in site.nodes() if is_gpu_node(n)]
    except K8sError as error:
        return Finding(name, "fail", str(error))
    if not nodes:
        return Finding(
            name,
            "fail",
            "no node has NVIDIA GPUs (no nvidia.com/gpu capacity or GPU labels)",
            "install the NVIDIA GPU Operator: helm install gpu-operator nvidia/gpu-operator "
            f"-n {site.operator_namespace} --create-namespace",
        )
    problems = [p for p in (node_mismatch(n, site.slices) for n in nodes) if p]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return Finding(name, "fail", problems[0] + more, restart_command(site.operator_namespace))
    unlabelled = [n.name for n in nodes if n.physical is None]
    if unlabelled:
        return Finding(
            name,
            "warn",
            f"no {GPU_COUNT_LABEL} label on {', '.join(unlabelled)}: their replicas cannot be "
            "checked (is GPU Feature Discovery running?)",
            f"kubectl -n {site.operator_namespace} get pods -l app=gpu-feature-discovery",
        )
    idle = [n.name for n in nodes if not n.schedulable]
    status = "warn" if idle else "ok"
    note = f"; not Ready or cordoned (not counted): {', '.join(idle)}" if idle else ""
    shown = ", ".join(_describe(n) for n in nodes[:4]) + (" ..." if len(nodes) > 4 else "")
    return Finding(
        name, status, f"{len(nodes)} GPU node(s) advertise GPUs x replicas: {shown}{note}"
    )


def check_device_plugin(site: KubeSite) -> Finding:
    name = "device plugin"
    if not site.reachable():
        return Finding(name, "warn", SKIPPED)
    ns = site.operator_namespace
    install = (
        f"helm install gpu-operator nvidia/gpu-operator -n {ns} --create-namespace "
        "(docs/admin-kubernetes.md)"
    )
    try:
        policies = site.cluster_policies()
        if not policies:
            what = "no ClusterPolicy" if policies is not None else "no ClusterPolicy CRD"
            return Finding(
                name, "fail", f"{what}: the NVIDIA GPU Operator is not installed", install
            )
        cluster = site.cluster()
        plugin = cluster.call(
            f"read daemonset {ns}/{DEVICE_PLUGIN_DAEMONSET}",
            lambda: cluster.client.AppsV1Api(cluster.api_client).read_namespaced_daemon_set(
                DEVICE_PLUGIN_DAEMONSET, ns, _request_timeout=site.timeout
            ),
            missing_ok=True,
        )
    except K8sError as error:
        return Finding(name, "fail", str(error))
    if plugin is None:
        return Finding(
            name,
            "fail",
            f"the GPU Operator is installed but there is no daemonset {ns}/{DEVICE_PLUGIN_DAEMONSET}",
            f"kubectl -n {ns} get pods; kubectl get clusterpolicies -o yaml (devicePlugin.enabled)",
        )
    status = plugin.status
    ready, wanted = (status.number_ready or 0), (status.desired_number_scheduled or 0)
    if ready < wanted or wanted == 0:
        return Finding(
            name,
            "fail",
            f"{ready} of {wanted} device plugin pod(s) ready",
            f"kubectl -n {ns} describe daemonset/{DEVICE_PLUGIN_DAEMONSET}",
        )
    policy = policies[0]["metadata"]["name"]
    return Finding(
        name, "ok", f"GPU Operator (ClusterPolicy {policy}), device plugin {ready}/{wanted} ready"
    )


def _replicas(configmap: Any) -> int | None:
    import yaml

    try:
        config = yaml.safe_load((configmap.data or {}).get(SLICED_KEY) or "") or {}
        resources = config["sharing"]["timeSlicing"]["resources"]
        return int(resources[0]["replicas"])
    except (yaml.YAMLError, KeyError, IndexError, TypeError, ValueError):
        return None


def check_time_slicing(site: KubeSite) -> Finding:
    name = "time-slicing"
    if not site.reachable():
        return Finding(name, "warn", SKIPPED)
    ns, cm = site.operator_namespace, site.configmap
    apply = f"gpulane k8s time-slicing --replicas {site.slices or 'N'} --apply"
    try:
        cluster = site.cluster()
        found = cluster.call(
            f"read ConfigMap {ns}/{cm}",
            lambda: cluster.core.read_namespaced_config_map(cm, ns, _request_timeout=site.timeout),
            missing_ok=True,
        )
        policies = site.cluster_policies() or []
        nodes = site.nodes()
    except K8sError as error:
        return Finding(name, "fail", str(error))
    if found is None:
        whole = site.slices in (None, 1)
        return Finding(
            name,
            "ok" if site.slices == 1 else "warn",
            f"no ConfigMap {ns}/{cm}: GPUs are not time-sliced"
            + ("" if whole else f", but the profiles ask for {site.slices} slices per GPU"),
            "" if site.slices == 1 else apply,
        )
    replicas = _replicas(found)
    if replicas is None:
        return Finding(name, "fail", f"ConfigMap {ns}/{cm} has no time-slicing replicas", apply)
    pointed = [
        p["metadata"]["name"]
        for p in policies
        if ((p.get("spec") or {}).get("devicePlugin") or {}).get("config", {}).get("name") == cm
    ]
    if not pointed:
        return Finding(
            name,
            "fail",
            f"ConfigMap {ns}/{cm} ({replicas} replicas) is not the ClusterPolicy's "
            "spec.devicePlugin.config: the device plugin does not read it",
            apply,
        )
    if site.slices is not None and site.slices != replicas:
        return Finding(
            name,
            "fail",
            f"ConfigMap {ns}/{cm} has {replicas} replicas, the profiles {site.slices} slices per GPU",
            apply,
        )
    stale = []
    for node in nodes:
        labels = (node.get("metadata") or {}).get("labels") or {}
        seen = node_gpus(node)
        sliced = labels.get(NODE_CONFIG_LABEL, SLICED_KEY) != WHOLE_KEY
        if sliced and is_gpu_node(node) and seen.replicas is not None and seen.replicas != replicas:
            stale.append(f"{seen.name} ({seen.replicas})")
    if stale:
        return Finding(
            name,
            "fail",
            f"ConfigMap {ns}/{cm} says {replicas} replicas, GPU feature discovery on "
            f"{', '.join(stale)}: replicas not applied",
            restart_command(ns),
        )
    return Finding(
        name, "ok", f"ConfigMap {ns}/{cm}: {replicas} replicas per GPU, used by {pointed[0]}"
    )


K8S_CHECKS: tuple[Callable[[KubeSite], Finding], ...] = (
    check_api,
    check_hub_access,
    check_gpu_nodes,
    check_device_plugin,
    check_time_slicing,
    check_network_policy,
    check_dashboard,
    check_unseen,
)


def run_k8s_checks(site: KubeSite) -> list[Finding]:
    return run_each(K8S_CHECKS, site)
