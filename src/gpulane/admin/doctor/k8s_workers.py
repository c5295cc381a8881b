"""``gpulane doctor --k8s``, the ``%%gpu`` worker pods' part: do the hub namespace's
NetworkPolicies say what ``gpulane k8s hub-values`` meant, and what doctor cannot see.

The policies are read from the API and their meaning worked out with
:func:`gpulane.admin.k8s_netpol.allowed` for stand-ins of the pods involved (the namespace's
own hub, proxy and a user pod where they run, their labels otherwise; a worker with the
labels the broker gives it): a worker reaches its kernel's callback ports and DNS, and
nothing else; nothing reaches a worker; kernels and the proxy reach the gpulane service's
port on the hub pod. Whether the network obeys them is another matter (:func:`check_unseen`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gpulane.admin.doctor.context import Finding
from gpulane.admin.k8s_netpol import Pod, allowed
from gpulane.admin.k8s_network import (
    API_PORT,
    SERVICE_HOST,
    SERVICE_PORT,
    USER_PODS,
    WORKER_COMPONENT,
    WORKER_POLICY,
)
from gpulane.admin.k8s_time_slicing import ApiRefused, K8sError

if TYPE_CHECKING:
    from gpulane.admin.doctor.k8s import KubeSite

NAME = "network policy"
# The labels the broker puts on every worker pod (broker/worker_pods.py).
WORKER_LABELS = {
    **WORKER_COMPONENT,
    "app.kubernetes.io/managed-by": "gpulane",
    "hub.jupyter.org/network-access-singleuser": "true",
    "gpulane.io/job": "1",
    "gpulane.io/user": "doctor",
}
# Where the chart's pods run none (no user server now): its labels, and the ones its
# values give (singleuser.extraLabels; the proxy's pod template).
CHART_LABELS = {
    "hub": {"component": "hub", "app": "jupyterhub"},
    "proxy": {
        "component": "proxy",
        "app": "jupyterhub",
        "hub.jupyter.org/network-access-hub": "true",
        "hub.jupyter.org/network-access-singleuser": "true",
    },
    "singleuser-server": {
        "component": "singleuser-server",
        "app": "jupyterhub",
        "hub.jupyter.org/network-access-hub": "true",
    },
}
# The chart's named container ports (its policies name them), where a pod's spec is not read.
CHART_PORTS = {
    "hub": {"http": 8081},
    "proxy": {"http": 8000, "https": 8443, "api": 8001},
    "singleuser-server": {"notebook-port": 8888},
}
OUTSIDE = "198.51.100.7"  # an address on the internet (TEST-NET-2)
FIX = (
    "kubectl apply -f gpulane-rbac.yaml; helm upgrade with the values of gpulane k8s hub-values "
    "(docs/admin-kubernetes.md, 'Network policy')"
)


def _items(site: KubeSite, what: str, call: Any) -> list[dict[str, Any]]:
    cluster = site.cluster()
    listing = cluster.call(what, call)
    data = cluster.api_client.sanitize_for_serialization(listing)
    return list(data.get("items") or [])


RELEASE_LABELS = ("app", "release", "app.kubernetes.io/name", "app.kubernetes.io/instance")


def _stand_in(site: KubeSite, component: str, ip: str, release: dict[str, str]) -> Pod:
    """The namespace's own pod of that component where one runs, else one with the chart's
    labels for it and the release's (``release``: those of the hub pod)."""
    cluster, ns = site.cluster(), site.hub_namespace
    found = _items(
        site,
        f"list {component} pods in {ns}",
        lambda: cluster.core.list_namespaced_pod(
            ns, label_selector=f"component={component}", limit=1, _request_timeout=site.timeout
        ),
    )
    ports = dict(CHART_PORTS[component])
    if found:
        metadata, status = found[0]["metadata"], found[0].get("status") or {}
        for container in (found[0].get("spec") or {}).get("containers") or []:
            for port in container.get("ports") or []:
                if port.get("name") and port.get("containerPort"):
                    ports[port["name"]] = int(port["containerPort"])
        labels = metadata.get("labels") or {}
        return Pod(metadata["name"], ns, labels, status.get("podIP") or ip, ports)
    return Pod(component, ns, {**CHART_LABELS[component], **release}, ip, ports)


def _callback_ports(policy: dict[str, Any]) -> tuple[int, int] | None:
    """The user pods' ports the worker policy opens (hub-values writes one range)."""
    for rule in (policy.get("spec") or {}).get("egress") or []:
        peers = rule.get("to") or []
        if any(((p.get("podSelector") or {}).get("matchLabels") or {}) == USER_PODS for p in peers):
            for port in rule.get("ports") or []:
                if isinstance(port.get("port"), int):
                    return port["port"], int(port.get("endPort") or port["port"])
    return None


def check_network_policy(site: KubeSite) -> Finding:
    from gpulane.admin.doctor.k8s import SKIPPED

    if not site.reachable():
        return Finding(NAME, "warn", SKIPPED)
    ns = site.hub_namespace
    try:
        cluster = site.cluster()
        networking = cluster.client.NetworkingV1Api(cluster.api_client)
        policies = _items(
            site,
            f"list NetworkPolicies in {ns}",
            lambda: networking.list_namespaced_network_policy(ns, _request_timeout=site.timeout),
        )
        for policy in policies:
            policy["metadata"].setdefault("namespace", ns)
        worker_policy = next((p for p in policies if p["metadata"]["name"] == WORKER_POLICY), None)
        if worker_policy is None:
            return Finding(
                NAME,
                "fail",
                f"no NetworkPolicy {ns}/{WORKER_POLICY}: %%gpu worker pods (users' code on "
                "GPU nodes) are not isolated, and may reach whatever the pod network allows",
                "kubectl apply -f gpulane-rbac.yaml (written by gpulane k8s hub-values)",
            )
        ports = _callback_ports(worker_policy)
        if ports is None:
            return Finding(
                NAME,
                "fail",
                f"NetworkPolicy {ns}/{WORKER_POLICY} opens no port of user pods to %%gpu "
                "workers: cells would never reach their kernels",
                FIX,
            )
        hub = _stand_in(site, "hub", "10.255.0.2", {})
        release = {k: v for k, v in hub.labels.items() if k in RELEASE_LABELS}
        proxy = _stand_in(site, "proxy", "10.255.0.3", release)
        user = _stand_in(site, "singleuser-server", "10.255.1.1", release)
    except ApiRefused as error:
        if error.status != 403:
            return Finding(NAME, "fail", str(error))
        return Finding(
            NAME,
            "warn",
            f"cannot read NetworkPolicies or pods in {ns} with these credentials (the hub's "
            "service account may not read NetworkPolicies)",
            "run gpulane doctor --k8s with a cluster admin's kubeconfig",
        )
    except K8sError as error:
        return Finding(NAME, "fail", str(error))
    worker = Pod("gpulane-worker", ns, WORKER_LABELS, "10.255.2.1")
    dns = Pod("dns", "kube-system", {"k8s-app": "kube-dns"}, "10.255.9.9")
    low, high = ports
    expected = (
        (worker, user, low, "TCP", True, f"a worker reach its kernel on port {low}"),
        (worker, user, high, "TCP", True, f"a worker reach its kernel on port {high}"),
        (worker, dns, 53, "UDP", True, "a worker ask DNS in kube-system"),
        (worker, user, 8888, "TCP", False, "a worker reach a user's Jupyter server (8888)"),
        (worker, hub, SERVICE_PORT, "TCP", False, f"a worker reach the broker ({SERVICE_PORT})"),
        (worker, hub, API_PORT, "TCP", False, f"a worker reach the broker's API ({API_PORT})"),
        (worker, hub, 8081, "TCP", False, "a worker reach the hub's API (8081)"),
        (worker, OUTSIDE, 443, "TCP", False, "a worker reach the internet"),
        (user, worker, low, "TCP", False, "a user pod reach a worker"),
        (hub, worker, low, "TCP", False, "the hub pod reach a worker"),
        (user, hub, API_PORT, "TCP", True, f"a kernel reach the broker's API ({API_PORT})"),
        (proxy, hub, SERVICE_PORT, "TCP", True, f"the proxy reach the dashboard ({SERVICE_PORT})"),
    )
    wrong = [
        ("would not let " if want else "would let ") + text
        for source, target, port, protocol, want, text in expected
        if allowed(policies, source, target, port, protocol) != want
    ]
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        return Finding(NAME, "fail", f"the NetworkPolicies in {ns} {wrong[0]}{more}", FIX)
    return Finding(
        NAME,
        "ok",
        f"as {ns}'s {len(policies)} NetworkPolicies read: %%gpu workers reach user pods on "
        f"{low}-{high} and DNS only, nothing reaches them; kernels reach the broker's API "
        f"on {API_PORT}, the proxy the dashboard on {SERVICE_PORT}",
    )


def check_dashboard(site: KubeSite) -> Finding:
    """The gpulane service's port on the hub's Service, where the proxy pod sends the
    dashboard, and the broker's API port, where kernels in user pods send their requests
    (``hub.service.extraPorts`` in hub-values' values)."""
    from gpulane.admin.doctor.k8s import SKIPPED

    name = "dashboard"
    if not site.reachable():
        return Finding(name, "warn", SKIPPED)
    ns = site.hub_namespace
    cluster = site.cluster()
    try:
        service = cluster.call(
            f"read Service {ns}/{SERVICE_HOST}",
            lambda: cluster.core.read_namespaced_service(
                SERVICE_HOST, ns, _request_timeout=site.timeout
            ),
            missing_ok=True,
        )
    except K8sError as error:
        return Finding(name, "fail", str(error))
    if service is None:
        return Finding(
            name,
            "fail",
            f"no Service {ns}/{SERVICE_HOST}: is the hub installed here, or renamed by "
            "fullnameOverride (then set GpulaneHub.dashboard_url to match)?",
            f"kubectl -n {ns} get services",
        )
    ports = [p.port for p in service.spec.ports or []]
    absent = [
        f"no port {port} (ports {', '.join(map(str, ports)) or 'none'}): {what}"
        for port, what in (
            (SERVICE_PORT, "the proxy cannot reach the dashboard"),
            (API_PORT, "kernels in user pods cannot reach the broker's API"),
        )
        if port not in ports
    ]
    if absent:
        return Finding(
            name,
            "fail",
            f"Service {ns}/{SERVICE_HOST} has " + "; ".join(absent),
            "helm upgrade with the values of gpulane k8s hub-values (hub.service.extraPorts)",
        )
    return Finding(
        name,
        "ok",
        f"Service {ns}/{SERVICE_HOST} has port {SERVICE_PORT}: the proxy sends "
        f"/services/gpulane/ to the dashboard in the hub pod; and port {API_PORT}: kernels "
        "reach the broker's API (GPULANE_BROKER_URL)",
    )


def check_unseen(site: KubeSite) -> Finding:
    """What an admin must try on the cluster: doctor reads objects, not traffic."""
    return Finding(
        "not checked",
        "info",
        "doctor reads the API, not the network: that the CNI enforces NetworkPolicy (and "
        "endPort ranges); that the user image's ip_local_port_range lies inside the worker "
        "ports; that a worker pod starts on a GPU node and reaches its kernel (run one %%gpu "
        "cell, then one as a second user)",
        f"kubectl -n {site.hub_namespace} get networkpolicy; docs/admin-kubernetes.md, "
        "'Before the first %%gpu cell'",
    )
