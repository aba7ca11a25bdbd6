"""Policy fields Propolis accepts (Cilium's schema) but does not enforce yet, each with why.

Why: a field that is accepted, marked Valid and then does nothing is a silent fail-open (an L7
rule opens its port to every request). Every such field is named here once, with the effect it
has meanwhile, and shown on the object (`status.conditions`, see `propolis.k8s.status`), in
`propolis policy get` and counted in `propolis status`. When a proxy lands, its line goes.

`not_enforced` walks the raw object (after `parse.parse_policy_object` accepted it) so the
paths are the ones the API user wrote (``specs[1].egress[0].toPorts[0].rules``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from propolis.policy.proxy_ports import ENFORCED_FAMILIES

L7_PROXY = "no L7 proxy enforces this rule family yet (only HTTP and DNS are): the port is open to every request"
NOT_ENFORCED_REASONS: dict[str, str] = {
    "rules": L7_PROXY,
    "terminatingTLS": "the L7 proxy is not running: TLS is not terminated, the port allows the connection",
    "originatingTLS": "the L7 proxy is not running: TLS is not originated, the port allows the connection",
    "serverNames": "the L7 proxy is not running: SNI is not checked, the port allows every server name",
    "listener": "the L7 proxy is not running: no Envoy listener, the port allows the connection",
    "toGroups": "cloud provider groups are not supported: the rule selects nothing",
    "fromGroups": "cloud provider groups are not supported: the rule selects nothing",
    "authentication": "mutual authentication is not implemented: the rule allows nothing (fail closed)",
    "entity:ingress": "no ingress proxy runs here, so no address carries reserved:ingress: selects nothing",
    "entity:unmanaged": "every pod is managed by Propolis, so no address carries reserved:unmanaged: selects nothing",
    "nodeSelector": "enforced only on nodes whose datapath-writer runs with hostFirewall enabled (`propolis status`: "
                    "Host firewall); elsewhere the rule does nothing",
    "log": "policy log values are not attached to flows yet",
}
AUTH_ENFORCING_MODES = ("required", "test-always-fail")
L7_FAMILIES = ("http", "kafka", "dns", "l7proto", "l7")
SECTIONS = ("ingress", "ingressDeny", "egress", "egressDeny")


@dataclass(frozen=True)
class NotEnforced:
    """One accepted field that has no effect (or a narrower one) until its component exists."""

    field: str  # path in the object, e.g. spec.egress[0].toPorts[0].rules
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


def _rule(doc: Any, where: str) -> list[NotEnforced]:
    if not isinstance(doc, dict):
        return []
    out = [NotEnforced(f"{where}.{k}", NOT_ENFORCED_REASONS[k]) for k in ("nodeSelector", "log")
           if doc.get(k) is not None]
    for section in SECTIONS:
        for i, peer in enumerate(doc.get(section) or []):
            if not isinstance(peer, dict):
                continue
            at = f"{where}.{section}[{i}]"
            for key in ("toGroups", "fromGroups"):
                if peer.get(key):
                    out.append(NotEnforced(f"{at}.{key}", NOT_ENFORCED_REASONS[key]))
            auth = peer.get("authentication")
            if isinstance(auth, dict) and auth.get("mode") in AUTH_ENFORCING_MODES:
                out.append(NotEnforced(f"{at}.authentication.mode", NOT_ENFORCED_REASONS["authentication"]))
            for key in ("fromEntities", "toEntities"):
                for j, entity in enumerate(peer.get(key) or []):
                    if f"entity:{entity}" in NOT_ENFORCED_REASONS:
                        out.append(NotEnforced(f"{at}.{key}[{j}]", NOT_ENFORCED_REASONS[f"entity:{entity}"]))
            for j, port_rule in enumerate(peer.get("toPorts") or []):
                if not isinstance(port_rule, dict):
                    continue
                rules = port_rule.get("rules")
                if isinstance(rules, dict) and any(rules.get(f) for f in L7_FAMILIES if f not in ENFORCED_FAMILIES):
                    out.append(NotEnforced(f"{at}.toPorts[{j}].rules", NOT_ENFORCED_REASONS["rules"]))
                for key in ("terminatingTLS", "originatingTLS", "serverNames", "listener"):
                    if port_rule.get(key):
                        out.append(NotEnforced(f"{at}.toPorts[{j}].{key}", NOT_ENFORCED_REASONS[key]))
    return out


def not_enforced(obj: Any) -> list[NotEnforced]:
    """Every accepted-but-not-enforced field of a policy object (``spec`` and each ``specs[i]``).

    A NetworkPolicy has none of these fields, so it yields nothing."""
    if not isinstance(obj, dict):
        return []
    out = _rule(obj.get("spec"), "spec")
    for i, spec in enumerate(obj.get("specs") or []):
        out.extend(_rule(spec, f"specs[{i}]"))
    return out
