"""Which L7 rules judge a redirected connection, from the same inputs and compiler as the datapath-writer.

The proxy follows the k8s and identities buckets (`writer.inputs.ClusterInputs`, watermark-gated as
the writer's) and compiles policies with the writer's `DesiredState`, so its rules are exactly those
that set the proxy port. Addresses become identities through the ipcache bucket (every node's
endpoints, as their writers published them), never a guess; an address no node owns is
reserved:world. For an ingress redirect the rules are the server's ingress rules for the client's
identity, for an egress redirect the client's egress rules for the server's identity: the union of
the HTTP rules of every entry (that peer, or any peer) on that port redirected to that listener.
No entry = no rule = every request denied (fail closed).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from propolis.bus.kv import EventType, KvEvent
from propolis.l7 import kafka
from propolis.l7.http import compile_rules
from propolis.model import identity as idm
from propolis.policy.entries import PROTO_TCP, L7Annotation
from propolis.writer.desired import DesiredState
from propolis.writer.inputs import ClusterInputs


@dataclass
class Verdict:
    """What judges one connection: its endpoint and peer identities and the compiled rules."""

    endpoint_identity: int
    peer_identity: int
    rules: tuple[Any, ...]  # HTTPRuleMatcher or kafka.KafkaRuleMatcher, by the listener's family
    policies: tuple[str, ...]  # origins of the rules (for logs and flows)


@dataclass
class ProxyPolicy:
    node: str
    cluster_name: str | None = None  # as the datapath-writer's (policies may select by cluster)
    mode: str = "default"  # the writer's policy enforcement mode ("never": nothing is redirected anyway)
    inputs: ClusterInputs = field(default_factory=ClusterInputs)
    #: ip -> identity from the ipcache bucket (every node's endpoints)
    ipcache: dict[str, int] = field(default_factory=dict)
    _rows: dict[str, str] = field(default_factory=dict)  # ipcache key -> its ip
    _desired: DesiredState = field(init=False)
    _compiled: dict[L7Annotation, tuple[Any, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._desired = DesiredState(self.node, mode=self.mode, cluster_name=self.cluster_name)

    def ipcache_event(self, ev: KvEvent) -> None:
        """One `<node>.<ip>` row of the ipcache bucket (an address moving between nodes keeps the newest)."""
        if ev.type is EventType.PUT and ev.value is not None and hasattr(ev.value, "identity"):
            self._rows[ev.key] = ev.value.ip
            self.ipcache[ev.value.ip] = ev.value.identity
        elif ev.type is EventType.DELETE and ev.key in self._rows:
            ip = self._rows.pop(ev.key)
            if ip not in self._rows.values():
                self.ipcache.pop(ip, None)

    @property
    def ready(self) -> bool:
        return self.inputs.synced

    def identity_of(self, ip: str) -> int:
        found = self.ipcache.get(ip)
        if found:
            return found
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return idm.RESERVED_WORLD
        for obj in self.inputs.nodes.values():
            for a in obj.status.get("addresses") or []:
                if a.get("type") == "InternalIP" and a.get("address") == str(addr):
                    return idm.RESERVED_HOST if obj.name == self.node else idm.RESERVED_REMOTE_NODE
        return idm.RESERVED_WORLD

    def _matchers(self, ann: L7Annotation) -> tuple[Any, ...]:
        found = self._compiled.get(ann)
        if found is None:
            if len(self._compiled) > 4096:
                self._compiled.clear()
            found = self._compiled[ann] = (kafka.compile_rules(ann.rules.kafka) if ann.kind == "kafka"
                                           else compile_rules(ann.rules.http))
        return found

    def http_verdict(self, direction: str, listener_port: int, client: tuple[str, int],
                     server: tuple[str, int]) -> Verdict:
        """The HTTP rules for a connection from `client` to `server` (original destination)."""
        return self.verdict("http", direction, listener_port, client, server)

    def verdict(self, family: str, direction: str, listener_port: int, client: tuple[str, int],
                server: tuple[str, int]) -> Verdict:
        """The rules of one L7 family ("http", "kafka") for a connection from `client` to `server`."""
        endpoint_ip, peer_ip = (server[0], client[0]) if direction == "ingress" else (client[0], server[0])
        endpoint_identity, peer_identity = self.identity_of(endpoint_ip), self.identity_of(peer_ip)
        if not self.ready or endpoint_identity in (idm.RESERVED_WORLD, idm.RESERVED_HOST):
            return Verdict(endpoint_identity, peer_identity, (), ())
        result = self._desired.compiled(self.inputs, endpoint_identity)
        port = server[1]
        rules: list[Any] = []
        origins: set[str] = set()
        for entry, anns in result.l7.items():
            if entry.direction != direction or entry.deny or entry.proxy_port != listener_port:
                continue
            if entry.identity not in (0, peer_identity) or entry.protocol not in (0, PROTO_TCP):
                continue
            if not (entry.port == 0 or entry.port <= port <= (entry.end_port or entry.port)):
                continue
            for ann in anns:
                if ann.kind == family:
                    rules.extend(self._matchers(ann))
                    origins.add(ann.origin)
        return Verdict(endpoint_identity, peer_identity, tuple(rules), tuple(sorted(origins)))
