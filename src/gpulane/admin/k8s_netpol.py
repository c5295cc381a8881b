"""A small pure reading of Kubernetes NetworkPolicy (networking.k8s.io/v1): may A reach B?

No cluster, no CNI: :func:`allowed` applies the API's documented meaning to a list of
policies, so ``gpulane doctor --k8s`` (on the policies a cluster holds) and the tests (on
those hub-values writes) can ask which pod may open which port of which other pod. It follows
https://kubernetes.io/docs/concepts/services-networking/network-policies/:

- a pod is isolated for a direction when a policy in its namespace selects it and has that
  direction in ``policyTypes`` (default: Ingress, plus Egress where ``egress`` is given);
- traffic passes when the sender's egress and the receiver's ingress both allow it (a
  non-isolated side allows everything; an address outside the cluster has no policy);
- a rule allows when one of its peers matches (none listed: every peer) and one of its
  ports matches (none listed: every port); ``podSelector`` alone means this namespace,
  ``namespaceSelector`` alone every pod of the matching namespaces, both together pods
  matching both; ``ipBlock`` matches addresses, pods' too (the conservative reading:
  whether a CNI applies ipBlock to pod IPs is left to it, so treating it as applying can
  only make a policy look broader, never narrower);
- a named port is the receiving pod's container port of that name; ``endPort`` a range.

Selectors with ``matchExpressions`` are refused (not needed here; no silent wrong answer).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: Mapping[str, str]
    ip: str
    ports: Mapping[str, int] = field(default_factory=dict)  # named container ports


Peer = Pod | str  # a pod, or an address outside the cluster


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    if selector is None:
        return True
    if selector.get("matchExpressions"):
        raise NotImplementedError("matchExpressions are not read by this checker")
    wanted = selector.get("matchLabels") or {}
    return all(labels.get(k) == v for k, v in wanted.items())


def _address(peer: Peer) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(peer.ip if isinstance(peer, Pod) else peer)


def _peer_matches(
    rule_peer: Mapping[str, Any],
    policy_namespace: str,
    peer: Peer,
    namespaces: Mapping[str, Mapping[str, str]],
) -> bool:
    block = rule_peer.get("ipBlock")
    if block is not None:
        address = _address(peer)
        if address not in ipaddress.ip_network(block["cidr"]):
            return False
        return not any(address in ipaddress.ip_network(c) for c in block.get("except") or [])
    if not isinstance(peer, Pod):
        return False  # selectors select pods only
    namespace_selector = rule_peer.get("namespaceSelector")
    if namespace_selector is None:
        in_namespace = peer.namespace == policy_namespace
    else:
        labels = {
            "kubernetes.io/metadata.name": peer.namespace,
            **namespaces.get(peer.namespace, {}),
        }
        in_namespace = selects(namespace_selector, labels)
    return in_namespace and selects(rule_peer.get("podSelector"), peer.labels)


def _port_matches(
    ports: Sequence[Mapping[str, Any]] | None, port: int, protocol: str, receiver: Peer
) -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        value = entry.get("port")
        if value is None:
            return True
        if isinstance(value, str):
            if isinstance(receiver, Pod) and receiver.ports.get(value) == port:
                return True
        elif value <= port <= int(entry.get("endPort", value)):
            return True
    return False


def _types(spec: Mapping[str, Any]) -> list[str]:
    return list(spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])])


def _side_allows(
    policies: Sequence[Mapping[str, Any]],
    namespaces: Mapping[str, Mapping[str, str]],
    pod: Pod,
    other: Peer,
    direction: str,
    port: int,
    protocol: str,
    receiver: Peer,
) -> bool:
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    isolating = [
        p
        for p in policies
        if p["metadata"].get("namespace") == pod.namespace
        and selects(p["spec"].get("podSelector") or {}, pod.labels)
        and direction in _types(p["spec"])
    ]
    if not isolating:
        return True
    for policy in isolating:
        for rule in policy["spec"].get(key) or []:
            peers = rule.get(peers_key)
            peer_ok = not peers or any(
                _peer_matches(p, pod.namespace, other, namespaces) for p in peers
            )
            if peer_ok and _port_matches(rule.get("ports"), port, protocol, receiver):
                return True
    return False


def allowed(
    policies: Sequence[Mapping[str, Any]],
    source: Peer,
    target: Peer,
    port: int,
    protocol: str = "TCP",
    namespaces: Mapping[str, Mapping[str, str]] | None = None,
) -> bool:
    """May ``source`` open ``port`` on ``target`` under these policies?"""
    labels = namespaces or {}
    egress = not isinstance(source, Pod) or _side_allows(
        policies, labels, source, target, "Egress", port, protocol, target
    )
    ingress = not isinstance(target, Pod) or _side_allows(
        policies, labels, target, source, "Ingress", port, protocol, target
    )
    return egress and ingress
