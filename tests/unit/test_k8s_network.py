"""What the network policies of ``gpulane k8s hub-values`` mean: which pod may reach which.

Read with tests/support/netpol.py (the API's documented meaning, no cluster, no CNI) over
zero-to-jupyterhub's own policies (its templates with default values) plus gpulane's
rules and the worker pods' policy. Whether a cluster's CNI enforces any of it is the one
thing no test here can say (docs/admin-kubernetes.md's checklist).
"""

from __future__ import annotations

from typing import Any

import pytest

from gpulane.admin.k8s_network import chart_values, parse_ports, worker_policy
from tests.support.netpol import Pod, allowed, chart_pod, chart_policies

KERNEL_PORT = 41234  # where a kernel's callback listener (port 0) may land
TRUE = "true"

HUB = chart_pod(
    "hub",
    "hub",
    "10.0.0.2",
    {
        "hub.jupyter.org/network-access-proxy-api": TRUE,
        "hub.jupyter.org/network-access-proxy-http": TRUE,
        "hub.jupyter.org/network-access-singleuser": TRUE,
    },
    http=8081,
)
PROXY = chart_pod(
    "proxy",
    "proxy",
    "10.0.0.3",
    {"hub.jupyter.org/network-access-hub": TRUE, "hub.jupyter.org/network-access-singleuser": TRUE},
    http=8000,
    api=8001,
)
ADA = chart_pod(
    "jupyter-ada",
    "singleuser-server",
    "10.0.1.1",
    {"hub.jupyter.org/network-access-hub": TRUE, "hub.jupyter.org/username": "ada"},
    **{"notebook-port": 8888},
)
BEN = chart_pod(
    "jupyter-ben",
    "singleuser-server",
    "10.0.1.2",
    {"hub.jupyter.org/network-access-hub": TRUE, "hub.jupyter.org/username": "ben"},
    **{"notebook-port": 8888},
)
# A worker pod with the agreed labels (docs/admin-kubernetes.md): it runs ada's cell.
WORKER = Pod(
    "gpulane-worker-7",
    "jhub",
    {
        "app.kubernetes.io/component": "gpulane-worker",
        "app.kubernetes.io/managed-by": "gpulane",
        "hub.jupyter.org/network-access-singleuser": TRUE,
        "gpulane.io/job": "7",
        "gpulane.io/user": "ada",
    },
    "10.0.2.1",
)
DNS = Pod("coredns", "kube-system", {"k8s-app": "kube-dns"}, "10.0.9.9", {"dns": 53})
ELSEWHERE = Pod("db", "research", {"app": "postgres"}, "10.0.5.5", {"pg": 5432})
API_SERVER = "172.18.0.2"  # the control plane: outside every pod
INTERNET = "93.184.216.34"
METADATA = "169.254.169.254"


def policies(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [
        *chart_policies(values if values is not None else chart_values()),
        worker_policy("jhub"),
    ]


def test_a_worker_reaches_its_kernel_and_dns_and_nothing_else() -> None:
    world = policies()
    assert allowed(world, WORKER, ADA, KERNEL_PORT)
    assert allowed(world, WORKER, DNS, 53, "UDP") and allowed(world, WORKER, DNS, 53)
    refused = [
        (ADA, 8888),  # the Jupyter server: the z2jh label would allow it, the worker's egress not
        (ADA, 1023),
        (ADA, 61000),  # outside the callback ports
        (HUB, 8081),
        (HUB, 9873),  # the broker
        (PROXY, 8000),
        (DNS, 80),
        (ELSEWHERE, 5432),
        (API_SERVER, 6443),
        (INTERNET, 443),
        (METADATA, 80),
    ]
    for target, port in refused:
        assert not allowed(world, WORKER, target, port), (target, port)
    assert not allowed(world, WORKER, ADA, KERNEL_PORT, "UDP")


def test_nothing_reaches_a_worker() -> None:
    world = policies()
    for source in (ADA, BEN, HUB, PROXY, ELSEWHERE, INTERNET):
        for port in (22, 8888, KERNEL_PORT):
            assert not allowed(world, source, WORKER, port), (source, port)


def test_kernels_and_the_proxy_reach_the_broker_and_nothing_new() -> None:
    world = policies()
    assert allowed(world, ADA, HUB, 9874)  # a kernel -> the broker's API (hub tokens only)
    assert allowed(world, PROXY, HUB, 9873)  # the dashboard, /services/gpulane/
    assert not allowed(world, ADA, HUB, 9873)  # kernels: the API's port, not the dashboard's
    assert not allowed(world, PROXY, HUB, 9874)  # the proxy: the dashboard, not the API
    assert not allowed(world, WORKER, HUB, 9874)  # a %%gpu worker never talks to the broker
    assert not allowed(world, ADA, HUB, 9875)
    for port in (9873, 9874):  # another namespace's pods: no
        assert not allowed(world, ELSEWHERE, HUB, port)
    # User pods still cannot reach each other, kernels' ports included.
    assert not allowed(world, ADA, BEN, KERNEL_PORT)
    assert not allowed(world, ADA, BEN, 8888)
    # What the chart allowed before is kept.
    assert allowed(world, PROXY, ADA, 8888) and allowed(world, ADA, HUB, 8081)
    assert allowed(world, ADA, INTERNET, 443) and not allowed(world, ADA, API_SERVER, 6443)


def test_without_gpulanes_rules_the_chart_blocks_the_worker_and_the_kernel() -> None:
    # The reason for the values: the chart alone opens user pods to labelled pods on the
    # notebook port only, and the hub only on 8081.
    world = policies({})
    assert not allowed(world, WORKER, ADA, KERNEL_PORT)
    assert not allowed(world, ADA, HUB, 9874)
    assert not allowed(world, PROXY, HUB, 9873)


def test_a_worker_of_one_user_can_reach_anothers_callback_port() -> None:
    # What a NetworkPolicy cannot say: "only its own user's pod" (no label matching between
    # pods). Ben's kernel's listener refuses a peer without its one-time key
    # (kernel/worker.py, CallbackWorker); this test pins the limit docs/admin-kubernetes.md states.
    assert allowed(policies(), WORKER, BEN, KERNEL_PORT)


def test_the_checker_itself() -> None:
    a = Pod("a", "ns", {"role": "a"}, "10.1.0.1", {"web": 80})
    b = Pod("b", "ns", {"role": "b"}, "10.1.0.2", {"web": 80})
    c = Pod("c", "other", {"role": "a"}, "10.2.0.1")
    assert allowed([], a, b, 80)  # no policy: everything

    def netpol(spec: dict[str, Any], namespace: str = "ns") -> dict[str, Any]:
        return {"metadata": {"name": "p", "namespace": namespace}, "spec": spec}

    deny_in = netpol({"podSelector": {}})  # policyTypes default: Ingress
    assert not allowed([deny_in], a, b, 80) and allowed([deny_in], b, INTERNET, 443)
    deny_out = netpol({"podSelector": {"matchLabels": {"role": "a"}}, "policyTypes": ["Egress"]})
    assert not allowed([deny_out], a, b, 80) and allowed([deny_out], b, a, 80)
    named = netpol({"podSelector": {}, "ingress": [{"ports": [{"port": "web"}]}]})
    assert allowed([named], a, b, 80) and not allowed([named], a, b, 81)
    # podSelector alone: this namespace only; with namespaceSelector {}: every namespace.
    same = netpol(
        {
            "podSelector": {},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "a"}}}]}],
        }
    )
    assert allowed([same], a, b, 1) and not allowed([same], c, b, 1)
    both = {"podSelector": {"matchLabels": {"role": "a"}}, "namespaceSelector": {}}
    anywhere = netpol({"podSelector": {}, "ingress": [{"from": [both]}]})
    assert allowed([anywhere], c, b, 1)
    ranged = netpol({"podSelector": {}, "ingress": [{"ports": [{"port": 10, "endPort": 20}]}]})
    assert allowed([ranged], a, b, 20) and not allowed([ranged], a, b, 21)
    block = {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.2.0.0/16"]}}
    cidr = netpol({"podSelector": {}, "ingress": [{"from": [block]}]})
    assert allowed([cidr], a, b, 1) and not allowed([cidr], c, b, 1)
    assert not allowed([cidr], INTERNET, b, 1)
    # Another namespace's policy does not isolate this one's pods.
    assert allowed([netpol({"podSelector": {}}, "other")], a, b, 80)
    with pytest.raises(NotImplementedError):
        allowed([netpol({"podSelector": {"matchExpressions": [{"key": "x"}]}})], a, b, 1)


@pytest.mark.parametrize(
    ("text", "expected"), [("32768-60999", (32768, 60999)), ("40000", (40000, 40000))]
)
def test_parse_ports(text: str, expected: tuple[int, int]) -> None:
    assert parse_ports(text) == expected


@pytest.mark.parametrize("text", ["", "a-b", "80-90", "5-", "60999-32768", "1024-65536"])
def test_parse_ports_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="must be"):
        parse_ports(text)
