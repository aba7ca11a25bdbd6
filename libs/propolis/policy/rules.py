"""Typed, validated policy rules: the one internal form of NetworkPolicy and CiliumNetworkPolicy.

Why: both APIs are parsed into these dataclasses (propolis.policy.parse) so the
compiler handles one shape. Selectors already carry the namespace scope Cilium
adds when it parses a namespaced policy. L7 sections are typed here (enforced by
the L7 proxy later).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from propolis.model.selectors import LabelSelector


def subnet_of(inner: ipaddress.IPv4Network | ipaddress.IPv6Network,
              outer: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    """`inner` lies within `outer`; networks of different families never do (ipaddress raises instead)."""
    if isinstance(inner, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(inner, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return inner.subnet_of(outer)
    return False


@dataclass(frozen=True)
class CIDRRule:
    """``cidr`` minus ``except`` holes (fromCIDR entries have no holes)."""

    cidr: str
    except_: tuple[str, ...] = ()
    cidr_group_ref: str = ""  # a CiliumCIDRGroup by name: its externalCIDRs
    cidr_group_selector: LabelSelector | None = None  # CiliumCIDRGroups by their labels


@dataclass(frozen=True)
class ServiceSelector:
    """One ``toServices`` item: ``k8sService`` (name set) or ``k8sServiceSelector`` (selector set).

    ``namespace`` "" = any namespace (a clusterwide policy's selector without one)."""

    namespace: str
    name: str = ""
    selector: LabelSelector | None = None


@dataclass(frozen=True)
class PortProtocol:
    """``port`` is a number (0 = any) or a named port; ``protocol`` TCP|UDP|SCTP|ICMP|ICMPv6|ANY."""

    port: int = 0
    name: str = ""
    end_port: int = 0
    protocol: str = "ANY"


@dataclass(frozen=True)
class HeaderMatch:
    name: str
    value: str = ""
    mismatch: str = ""
    secret: tuple[str, str] | None = None  # (namespace, name)


@dataclass(frozen=True)
class HTTPRule:
    method: str = ""
    path: str = ""
    host: str = ""
    headers: tuple[str, ...] = ()
    header_matches: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True)
class KafkaRule:
    role: str = ""
    api_key: str = ""
    api_version: str = ""
    client_id: str = ""
    topic: str = ""


@dataclass(frozen=True)
class DNSRule:
    """A DNS rule or toFQDNs selector: exactly one of match_name / match_pattern."""

    match_name: str = ""
    match_pattern: str = ""


@dataclass(frozen=True)
class L7Rules:
    """At most one family is non-empty (Cilium refuses mixes)."""

    http: tuple[HTTPRule, ...] = ()
    kafka: tuple[KafkaRule, ...] = ()
    dns: tuple[DNSRule, ...] = ()
    l7proto: str = ""
    l7: tuple[tuple[tuple[str, str], ...], ...] = ()

    @property
    def kind(self) -> str:
        if self.http:
            return "http"
        if self.kafka:
            return "kafka"
        if self.dns:
            return "dns"
        if self.l7proto:
            return self.l7proto
        return ""


@dataclass(frozen=True)
class PortRule:
    """One ``toPorts`` item: L4 ports plus optional L7 rules and TLS/listener settings."""

    ports: tuple[PortProtocol, ...] = ()
    rules: L7Rules | None = None
    server_names: tuple[str, ...] = ()
    terminating_tls: tuple[tuple[str, Any], ...] = ()
    originating_tls: tuple[tuple[str, Any], ...] = ()
    listener: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class ICMPField:
    family: str = "IPv4"
    type: int = 0


@dataclass(frozen=True)
class PeerRule:
    """One item of ingress / egress / ingressDeny / egressDeny (for NetworkPolicy: one ingress/egress rule).

    L3 fields are ``None`` when absent. A rule with no L3 field but with ports or
    ICMPs applies to every peer; a rule with nothing at all selects no peer.
    ``k8s_ipblock`` marks CIDRs from a NetworkPolicy ipBlock.
    """

    endpoints: tuple[LabelSelector, ...] | None = None
    requires: tuple[LabelSelector, ...] = ()
    entities: tuple[str, ...] | None = None
    cidrs: tuple[CIDRRule, ...] | None = None
    nodes: tuple[LabelSelector, ...] | None = None
    fqdns: tuple[DNSRule, ...] | None = None
    services: tuple[ServiceSelector, ...] | None = None
    groups: tuple[Any, ...] | None = None
    to_ports: tuple[PortRule, ...] = ()
    icmps: tuple[ICMPField, ...] = ()
    authentication: str = ""
    k8s_ipblock: bool = False

    @property
    def has_l3(self) -> bool:
        return any(f is not None for f in (self.endpoints, self.entities, self.cidrs, self.nodes,
                                           self.fqdns, self.services, self.groups))


@dataclass(frozen=True)
class Rule:
    """One Cilium rule (a CNP ``spec``/``specs[i]``, or a NetworkPolicy translated).

    A direction turns default-deny for the selected endpoints when its tuple (allow or
    deny) is non-empty and ``enable_default_deny_<dir>`` is not False.
    """

    subject: LabelSelector | None
    node_subject: LabelSelector | None = None  # nodeSelector: host firewall (not compiled for pods)
    ingress: tuple[PeerRule, ...] = ()
    ingress_deny: tuple[PeerRule, ...] = ()
    egress: tuple[PeerRule, ...] = ()
    egress_deny: tuple[PeerRule, ...] = ()
    enable_default_deny_ingress: bool | None = None
    enable_default_deny_egress: bool | None = None
    description: str = ""
    labels: tuple[str, ...] = ()
    origin: str = ""
    namespace: str = ""

    def sections(self, direction: str) -> tuple[tuple[PeerRule, ...], tuple[PeerRule, ...]]:
        return (self.ingress, self.ingress_deny) if direction == "ingress" else (self.egress, self.egress_deny)

    def default_deny(self, direction: str) -> bool:
        allow, deny = self.sections(direction)
        flag = self.enable_default_deny_ingress if direction == "ingress" else self.enable_default_deny_egress
        return bool(allow or deny) and flag is not False


@dataclass(frozen=True)
class Policy:
    """A parsed policy object: its identity (kind/namespace/name) and its rules."""

    kind: str
    namespace: str
    name: str
    rules: tuple[Rule, ...] = field(default_factory=tuple)

    @property
    def origin(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}" if self.namespace else f"{self.kind}/{self.name}"
