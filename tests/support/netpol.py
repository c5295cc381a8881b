"""zero-to-jupyterhub's own NetworkPolicies, transcribed, for reading with
:mod:`gpulane.admin.k8s_netpol` (which pod may reach which) in tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gpulane.admin.k8s_netpol import Pod as Pod
from gpulane.admin.k8s_netpol import allowed as allowed

RELEASE = "jhub"
PRIVATE = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
CLOUD_METADATA = "169.254.169.254/32"


def _chart_pods(component: str) -> dict[str, Any]:
    return {"matchLabels": {"component": component, "app": "jupyterhub", "release": RELEASE}}


def _egress_allow_rules(private_ips: bool, cloud_metadata: bool) -> list[dict[str, Any]]:
    """The chart's ``jupyterhub.networkPolicy.renderEgressRules`` with its default flags
    (all DNS rules and non-private addresses on; private and metadata as given)."""
    rules: list[dict[str, Any]] = [
        {
            "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
            "to": [
                {"ipBlock": {"cidr": CLOUD_METADATA}},
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "kube-system"}
                    }
                },
                *({"ipBlock": {"cidr": c}} for c in PRIVATE),
            ],
        },
        {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": [*PRIVATE, CLOUD_METADATA]}}]},
    ]
    if private_ips:
        rules.append({"to": [{"ipBlock": {"cidr": c}} for c in PRIVATE]})
    if cloud_metadata:
        rules.append({"to": [{"ipBlock": {"cidr": CLOUD_METADATA}}]})
    return rules


def _at(values: Mapping[str, Any], *path: str) -> list[dict[str, Any]]:
    node: Any = values
    for key in path:
        node = (node or {}).get(key)
    return list(node or [])


def chart_policies(values: Mapping[str, Any], namespace: str = "jhub") -> list[dict[str, Any]]:
    """zero-to-jupyterhub's hub, proxy and singleuser NetworkPolicies (chart 4.x templates,
    hub/netpol.yaml, proxy/netpol.yaml, singleuser/netpol.yaml, default flags), with the
    extra rules ``values`` adds (``hub.networkPolicy.ingress`` ...)."""

    def policy(name: str, component: str, ingress: list[Any], egress: list[Any]) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "podSelector": _chart_pods(component),
                "policyTypes": ["Ingress", "Egress"],
                "ingress": ingress,
                "egress": egress,
            },
        }

    def to(component: str, *ports: int) -> dict[str, Any]:
        return {
            "to": [{"podSelector": _chart_pods(component)}],
            "ports": [{"port": p} for p in ports],
        }

    def labelled(label: str, *ports: int | str) -> dict[str, Any]:
        return {
            "ports": [{"port": p} for p in ports],
            "from": [{"podSelector": {"matchLabels": {f"hub.jupyter.org/{label}": "true"}}}],
        }

    hub = policy(
        "hub",
        "hub",
        [labelled("network-access-hub", "http"), *_at(values, "hub", "networkPolicy", "ingress")],
        [
            to("proxy", 8001),
            to("singleuser-server", 8888),
            *_egress_allow_rules(private_ips=True, cloud_metadata=True),
            *_at(values, "hub", "networkPolicy", "egress"),
        ],
    )
    proxy = policy(
        "proxy",
        "proxy",
        [
            {"ports": [{"port": "http"}, {"port": "https"}]},
            labelled("network-access-proxy-http", "http"),
            labelled("network-access-proxy-api", "api"),
            *_at(values, "proxy", "chp", "networkPolicy", "ingress"),
        ],
        [
            to("hub", 8081),
            to("singleuser-server", 8888),
            *_egress_allow_rules(private_ips=True, cloud_metadata=True),
            *_at(values, "proxy", "chp", "networkPolicy", "egress"),
        ],
    )
    singleuser = policy(
        "singleuser",
        "singleuser-server",
        [
            labelled("network-access-singleuser", "notebook-port"),
            *_at(values, "singleuser", "networkPolicy", "ingress"),
        ],
        [
            to("hub", 8081),
            to("proxy", 8000),
            to("autohttps", 8080, 8443),
            *_egress_allow_rules(private_ips=False, cloud_metadata=False),
            *_at(values, "singleuser", "networkPolicy", "egress"),
        ],
    )
    return [hub, proxy, singleuser]


def chart_pod(name: str, component: str, ip: str, extra: Mapping[str, str], **ports: int) -> Pod:
    """A pod of the chart, labelled as the chart and KubeSpawner label it."""
    labels = {
        "component": component,
        "app.kubernetes.io/component": component,
        "app": "jupyterhub",
        "app.kubernetes.io/name": "jupyterhub",
        "release": RELEASE,
        **extra,
    }
    return Pod(name, "jhub", labels, ip, dict(ports))
