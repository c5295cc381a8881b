"""Who may reach whom, and what the hub may do, for ``%%gpu`` worker pods on zero-to-jupyterhub.

The broker in the hub pod creates one worker pod per GPU cell (and a Secret holding its
one-time key); the worker connects OUT to its user's kernel and listens on nothing. The
connections that needs, and nothing else:

- a kernel in a user pod -> the broker's API in the hub pod, on its own port
  (:data:`API_PORT`, ``--api-port``: hub tokens only, capped per client address;
  ``GPULANE_BROKER_URL=http://hub:PORT`` in the user pods);
- the proxy -> the gpulane service's port (:data:`SERVICE_PORT`, the dashboard's, routed at
  ``/services/gpulane/``; the service's URL is ``http://hub:PORT``, the chart's documented
  way to serve a JupyterHub service from the hub pod); user pods do not reach that one;
- a worker pod -> the user pods on the kernel's callback ports (the kernel listens on an
  ephemeral port: the kernel image's ``ip_local_port_range``, :data:`CALLBACK_PORTS`), and
  DNS in kube-system;
- nothing -> a worker pod.

The chart's own NetworkPolicies (on by default) isolate the hub, proxy and user pods: the
rules that open the service port to the proxy and the kernels, and the user pods' callback
ports to workers, go into those policies through the chart's values (:func:`chart_values`),
so they apply exactly where the chart's policies do; as separate objects they would isolate
those pods where an admin turned the chart's policies off. The worker pods' own policy
(:func:`worker_policy`) is a separate object: the chart knows nothing of them.

RBAC: the chart's hub Role (:data:`CHART_HUB_ROLE`, in the hub's namespace, where KubeSpawner
and the broker create pods) already grants everything worker pods need
(:data:`WORKER_NEEDS`); :func:`missing` says what it lacks, which is nothing as long as the
broker sets no ``blockOwnerDeletion`` on owner references (that would need ``update`` on
``pods/finalizers`` where the OwnerReferencesPermissionEnforcement admission plugin runs).
"""

from __future__ import annotations

from typing import Any

# The labels every worker pod carries (agreed with the worker pods' module).
WORKER_COMPONENT = {"app.kubernetes.io/component": "gpulane-worker"}
# The chart's pods, by the component label its own policies select them by.
HUB_PODS = {"component": "hub"}
USER_PODS = {"component": "singleuser-server"}
PROXY_PODS = {"component": "proxy"}
HUB_ACCESS = {"hub.jupyter.org/network-access-hub": "true"}  # the proxy's and user pods'
KUBE_SYSTEM = {"kubernetes.io/metadata.name": "kube-system"}
WORKER_POLICY = "gpulane-workers"
SERVICE_PORT = 9873  # GpulaneHub.dashboard_port's default
API_PORT = 9874  # GpulaneHub.api_port's default: the broker's API for kernels in user pods
SERVICE_HOST = "hub"  # the chart's Service for the hub pod (without fullnameOverride)
# Linux's default ip_local_port_range: where a kernel's callback listener (port 0) lands.
CALLBACK_PORTS = (32768, 60999)

# What the broker does in the hub's namespace for worker pods: create the pod and its key's
# Secret, follow the pod (phases, the reason Kubernetes refuses it, from events), delete both.
WORKER_NEEDS: tuple[tuple[str, str], ...] = (
    *((verb, "pods") for verb in ("create", "get", "list", "watch", "delete")),
    *((verb, "secrets") for verb in ("create", "get", "list", "watch", "delete")),
    *((verb, "events") for verb in ("get", "list", "watch")),
)
# zero-to-jupyterhub's hub Role (templates/hub/rbac.yaml, charts 1.x to 4.x), in the release's
# namespace: what the hub's service account may already do there.
CHART_HUB_ROLE: tuple[dict[str, Any], ...] = (
    {
        "apiGroups": [""],
        "resources": ["pods", "persistentvolumeclaims", "secrets", "services"],
        "verbs": ["get", "watch", "list", "create", "delete"],
    },
    {"apiGroups": [""], "resources": ["events"], "verbs": ["get", "watch", "list"]},
)


def missing(
    needs: tuple[tuple[str, str], ...], rules: tuple[dict[str, Any], ...]
) -> list[tuple[str, str]]:
    """The (verb, core resource) pairs of ``needs`` that no rule grants."""

    def granted(verb: str, resource: str) -> bool:
        return any(
            "" in rule.get("apiGroups", ())
            and {resource, "*"} & set(rule.get("resources", ()))
            and {verb, "*"} & set(rule.get("verbs", ()))
            for rule in rules
        )

    return [(verb, resource) for verb, resource in needs if not granted(verb, resource)]


def _tcp(port: int, end: int | None = None) -> dict[str, Any]:
    return {"protocol": "TCP", "port": port, **({"endPort": end} if end else {})}


def _callback(ports: tuple[int, int]) -> dict[str, Any]:
    low, high = ports
    return _tcp(low, high if high != low else None)


def worker_policy(namespace: str, ports: tuple[int, int] = CALLBACK_PORTS) -> dict[str, Any]:
    """The worker pods' own policy: no ingress at all; egress to user pods on the kernel's
    callback ports and to DNS in kube-system, nothing else (no hub, no API, no internet)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": WORKER_POLICY,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "gpulane"},
        },
        "spec": {
            "podSelector": {"matchLabels": dict(WORKER_COMPONENT)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": [
                {
                    "to": [{"podSelector": {"matchLabels": dict(USER_PODS)}}],
                    "ports": [_callback(ports)],
                },
                {
                    "to": [{"namespaceSelector": {"matchLabels": dict(KUBE_SYSTEM)}}],
                    "ports": [{"protocol": "UDP", "port": 53}, _tcp(53)],
                },
            ],
        },
    }


def chart_values(
    port: int = SERVICE_PORT,
    ports: tuple[int, int] = CALLBACK_PORTS,
    api_port: int = API_PORT,
) -> dict[str, Any]:
    """The chart values that open what the broker's service and the workers need in the
    chart's own policies, and give the hub's Service the service's and the API's ports:
    the dashboard's port to the proxy only, the API's to user pods only."""

    def to_hub(to: int) -> dict[str, Any]:  # one object per place (YAML would write an anchor)
        return {"to": [{"podSelector": {"matchLabels": dict(HUB_PODS)}}], "ports": [_tcp(to)]}

    def reaching(pods: dict[str, str], to: int) -> dict[str, Any]:
        # The chart's pods that carry its network-access-hub label, and of this component.
        return {
            "from": [{"podSelector": {"matchLabels": {**HUB_ACCESS, **pods}}}],
            "ports": [_tcp(to)],
        }

    return {
        "hub": {
            "service": {
                "extraPorts": [
                    {"name": "gpulane", "port": port, "targetPort": port},
                    {"name": "gpulane-api", "port": api_port, "targetPort": api_port},
                ],
            },
            "networkPolicy": {
                # The chart opens the hub's own port 8081 to pods with HUB_ACCESS; of those,
                # the proxy reaches the dashboard, the user pods (kernels) the broker's API.
                "ingress": [reaching(PROXY_PODS, port), reaching(USER_PODS, api_port)],
            },
        },
        "proxy": {"chp": {"networkPolicy": {"egress": [to_hub(port)]}}},
        "singleuser": {
            "networkPolicy": {
                "egress": [to_hub(api_port)],
                "ingress": [
                    {
                        "from": [{"podSelector": {"matchLabels": dict(WORKER_COMPONENT)}}],
                        "ports": [_callback(ports)],
                    }
                ],
            }
        },
    }


def parse_ports(text: str) -> tuple[int, int]:
    """``LOW-HIGH`` (or one port): the kernel's callback ports; ValueError, one line."""
    low_text, _, high_text = text.partition("-")
    try:
        low, high = int(low_text), int(high_text or low_text)
    except ValueError:
        raise ValueError(f"{text!r} must be a port or a range LOW-HIGH, e.g. 32768-60999") from None
    if not 1024 <= low <= high <= 65535:
        raise ValueError(f"{text!r} must be ports from 1024 to 65535, the low one first")
    return low, high
