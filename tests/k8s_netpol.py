"""Kubernetes NetworkPolicy semantics, small enough to read: may this pod open a connection to
that pod or address, given these policies? Both sides must allow it: the source's egress and, for
a pod, the destination's ingress. A pod that no policy of a direction selects is open in that
direction; a selected one only allows what some rule of those policies lists (rules add up).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: dict[str, str]
    ip: str
    name: str = ""

    def __str__(self) -> str:
        return self.name or f"{self.namespace}/{self.labels}"


@dataclass(frozen=True)
class Address:
    """Somewhere outside the pod network: the metadata service, the API server, the internet."""

    ip: str
    name: str = ""

    def __str__(self) -> str:
        return self.name or self.ip


@dataclass
class Network:
    policies: list[Obj]
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)

    def allowed(self, source: Pod, target: Pod | Address, port: int, protocol: str = "TCP") -> bool:
        if not self._passes(source, "Egress", "egress", "to", target, port, protocol):
            return False
        return not isinstance(target, Pod) or self._passes(target, "Ingress", "ingress", "from", source, port, protocol)

    def _passes(self, pod: Pod, kind: str, rules_key: str, peers_key: str, other: Pod | Address, port: int,
                protocol: str) -> bool:
        selecting = [p for p in self.policies if p["metadata"]["namespace"] == pod.namespace
                     and kind in p["spec"].get("policyTypes", ["Ingress"])
                     and selects(p["spec"]["podSelector"], pod.labels)]
        if not selecting:
            return True
        return any(self._rule_allows(rule, policy, peers_key, other, port, protocol)
                   for policy in selecting for rule in policy["spec"].get(rules_key, []))

    def _rule_allows(self, rule: Obj, policy: Obj, peers_key: str, other: Pod | Address, port: int,
                     protocol: str) -> bool:
        ports = rule.get("ports")
        if ports is not None and not any(p.get("port", port) == port and p.get("protocol", "TCP") == protocol
                                         for p in ports):
            return False
        peers = rule.get(peers_key)
        return not peers or any(self._peer_matches(peer, policy["metadata"]["namespace"], other) for peer in peers)

    def _peer_matches(self, peer: Obj, namespace: str, other: Pod | Address) -> bool:
        if "ipBlock" in peer:
            block = peer["ipBlock"]
            ip = ipaddress.ip_address(other.ip)
            return ip in ipaddress.ip_network(block["cidr"]) and \
                not any(ip in ipaddress.ip_network(c) for c in block.get("except", []))
        if not isinstance(other, Pod):
            return False
        if "namespaceSelector" in peer:
            labels = self.namespace_labels.get(other.namespace, {"kubernetes.io/metadata.name": other.namespace})
            if not selects(peer["namespaceSelector"], labels):
                return False
        elif other.namespace != namespace:
            return False
        return selects(peer.get("podSelector", {}), other.labels)


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {"Exists": key in labels, "DoesNotExist": key not in labels,
              "In": labels.get(key) in values, "NotIn": labels.get(key) not in values}[operator]
        if not ok:
            return False
    return True
