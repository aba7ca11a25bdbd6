"""Datapath event -> Hubble-shaped flow, enriched from the bus (identities, endpoints, services).

Why an `Enricher` fed by KV events instead of lookups per flow: the observer turns thousands of
events a second into flows, so every lookup is a dict hit on state kept current by KV watches
(identities and endpoints, ipcache, Services and EndpointSlices). Field names follow Hubble's
flow.proto as `hubble observe -o json` prints them.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from propolis.bus import subjects
from propolis.bus.messages import (
    EndpointRecord,
    FqdnCacheRecord,
    IdentityRecord,
    IpcacheEntry,
    K8sObject,
    WireguardNodeKey,
)
from propolis.maps import events as ev
from propolis.maps.drop import DROP_UNENCRYPTED_TRAFFIC, reason_name
from propolis.model.identity import CLUSTER_LABEL, RESERVED_NAMES

Flow = dict[str, Any]

#: Hubble's TraceObservationPoint enum names for our trace subtypes
OBSERVATION_POINTS = {0: "TO_ENDPOINT", 1: "TO_PROXY", 2: "TO_HOST", 3: "TO_STACK", 5: "FROM_ENDPOINT"}
#: Hubble's FlowType: L3_L4 for datapath events, L7 for proxy records
TYPE_L3_L4, TYPE_L7 = "L3_L4", "L7"
VERDICT_ERROR = "ERROR"
ICMP_TYPE_NAMES = {0: "EchoReply", 3: "DestinationUnreachable", 5: "Redirect", 8: "EchoRequest",
                   11: "TimeExceeded", 12: "ParameterProblem", 13: "TimestampRequest", 14: "TimestampReply"}
PROTOCOL_NAMES = {6: "TCP", 17: "UDP", 1: "ICMPv4", 58: "ICMPv6", 132: "SCTP"}
_POD_HASH = re.compile(r"^(?P<name>.+)-(?P<rs>[a-z0-9]{6,10})-[a-z0-9]{5}$")
_POD_ORDINAL = re.compile(r"^(?P<name>.+)-\d+$")
_POD_DS = re.compile(r"^(?P<name>.+)-[a-z0-9]{5}$")


_second_text: tuple[int, str] = (-1, "")


def rfc3339(ts: float) -> str:
    """Hubble's timestamp text (nanoseconds, UTC): fixed width, so it sorts and compares as a string.
    The seconds part is formatted once per second (flows arrive thousands a second)."""
    global _second_text
    secs = int(ts)
    nanos = int(round((ts - secs) * 1e9))
    if nanos >= 1_000_000_000:
        secs, nanos = secs + 1, nanos - 1_000_000_000
    if _second_text[0] != secs:
        _second_text = (secs, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)))
    return f"{_second_text[1]}.{nanos:09d}Z"


def workload_of(pod: str) -> dict[str, str]:
    """The pod's controller guessed from its name (the bus does not carry ownerReferences):
    Deployment pods are `<name>-<rs hash>-<5>`, StatefulSet `<name>-<n>`, DaemonSet `<name>-<5>`."""
    for pattern, kind in ((_POD_HASH, "Deployment"), (_POD_ORDINAL, "StatefulSet"), (_POD_DS, "DaemonSet")):
        m = pattern.match(pod)
        if m:
            return {"name": m.group("name"), "kind": kind}
    return {"name": pod, "kind": "Pod"}


@dataclass
class _Endpoint:
    namespace: str
    pod_name: str
    labels: list[str]
    workloads: list[dict[str, str]]
    node: str = ""


#: What the enricher reads of the k8s bucket (`Enricher.k8s_event`): Services and their EndpointSlices, not
#: Pods (names come from the identities bucket's endpoint records, of every node)
ENRICHER_K8S_KEYS = (subjects.k8s_keys("services"), subjects.k8s_keys("endpointslices"))
#: ... and of the identities bucket (`Enricher.identities_event`): identities and endpoints, not the label index
ENRICHER_IDENTITIES_KEYS = (subjects.IDENTITY_KEYS, subjects.ENDPOINT_KEYS)


@dataclass
class Enricher:
    """What a node knows about addresses and identities, kept current from KV watches."""

    cluster_name: str = "default"
    identities: dict[int, list[str]] = field(default_factory=dict)
    endpoints_by_key: dict[str, EndpointRecord] = field(default_factory=dict)
    endpoints_by_ip: dict[str, _Endpoint] = field(default_factory=dict)
    ipcache: dict[str, dict[str, int]] = field(default_factory=dict)  # ip -> node -> identity
    services: dict[str, K8sObject] = field(default_factory=dict)  # "ns.name" -> Service
    slices: dict[str, K8sObject] = field(default_factory=dict)
    frontends: dict[tuple[str, int], tuple[str, str]] = field(default_factory=dict)
    backends: dict[tuple[str, int], tuple[str, str]] = field(default_factory=dict)
    wireguard_nodes: set[str] = field(default_factory=set)  # nodes whose keymgr published its WireGuard key
    fqdn_names: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # node -> ip -> names its dns-proxy learned
    _services_dirty: bool = False
    _endpoint_cache: dict[tuple[str, int, int], dict[str, Any]] = field(default_factory=dict)

    # --- feeding (one method per bucket; value None = deleted) -------------------------------
    def identities_event(self, key: str, value: Any) -> None:
        self._endpoint_cache.clear()
        number = subjects.parse_identity_key(key)
        if number is not None:
            self._identity(number, value)
        elif subjects.parse_endpoint_key(key) is not None:
            old = self.endpoints_by_key.pop(key, None)
            if old is not None:
                for ip in old.ips:
                    self.endpoints_by_ip.pop(ip, None)
            if isinstance(value, EndpointRecord):
                self.endpoints_by_key[key] = value
                info = _Endpoint(value.namespace, value.name, sorted(value.labels), [workload_of(value.name)],
                                 value.node)
                for ip in value.ips:
                    self.endpoints_by_ip[ip] = info

    def _identity(self, number: int, value: Any) -> None:
        if isinstance(value, IdentityRecord):
            self.identities[number] = list(value.labels)
        else:
            self.identities.pop(number, None)

    def ipcache_event(self, key: str, value: Any) -> None:
        self._ipcache(*subjects.parse_ipcache_key(key), value)

    def _ipcache(self, node: str, ip: str, value: Any) -> None:
        self._endpoint_cache.clear()
        if isinstance(value, IpcacheEntry):
            self.ipcache.setdefault(value.ip, {})[node] = value.identity
        else:
            by_node = self.ipcache.get(ip, {})
            by_node.pop(node, None)
            if not by_node:
                self.ipcache.pop(ip, None)

    def wireguard_event(self, key: str, value: Any) -> None:
        """``PROPOLIS_WIREGUARD_V1`` (key = node): a node with its own key published runs cilium_wg0 and is
        a peer of every other such node (a foreign entry, another node's key, does not count)."""
        if isinstance(value, WireguardNodeKey) and value.node == key:
            self.wireguard_nodes.add(key)
        else:
            self.wireguard_nodes.discard(key)

    def fqdn_event(self, key: str, value: Any) -> None:
        """``PROPOLIS_FQDN_V1`` (key = node): what that node's dns-proxy learned (Hubble's `*_names`)."""
        if isinstance(value, FqdnCacheRecord):
            names: dict[str, set[str]] = {}
            for row in value.entries:
                names.setdefault(str(row.get("ip")), set()).add(str(row.get("name")).rstrip("."))  # as Hubble shows
            self.fqdn_names[key] = {ip: sorted(n) for ip, n in names.items()}
        else:
            self.fqdn_names.pop(key, None)

    def names(self, node: str, ip: str) -> list[str]:
        """The DNS names `node`'s endpoints resolved to `ip` (toFQDNs is per node, so are the names)."""
        return self.fqdn_names.get(node, {}).get(ip, [])

    def encrypted(self, node: str, src_ip: str, dst_ip: str) -> bool:
        """Hubble's `IP.encrypted`: the packet crosses to or from a pod on another node through cilium_wg0,
        i.e. WireGuard runs on this node and on the pod's node (the keymgr routes every other node's pod
        CIDR into the tunnel; same-node traffic and traffic to hosts or the world never enter it)."""
        if node not in self.wireguard_nodes:
            return False
        for ip in (src_ip, dst_ip):
            info = self.endpoints_by_ip.get(ip)
            if info is not None and info.node and info.node != node and info.node in self.wireguard_nodes:
                return True
        return False

    def clustermesh_event(self, key: str, value: Any) -> None:
        """Cluster Mesh cache (`<cluster>.identities.<id>`, `<cluster>.ip.<ip>`): remote peers get their
        identity and labels (and so their cluster_name and namespace) like local ones."""
        cluster, export_key = subjects.parse_clustermesh_cache_key(key)
        kind, rest = subjects.parse_export_key(export_key)
        if kind == "identities" and rest.isdigit():
            self._endpoint_cache.clear()
            self._identity(int(rest), value)
        elif kind == "ip":
            self._ipcache(f"@{cluster}", rest, value)  # a remote cluster's IPs, apart from every local node

    def k8s_event(self, key: str, value: Any) -> None:
        parsed = subjects.parse_k8s_key(key)
        if parsed is None:
            return
        kind, rest = parsed.kind, f"{parsed.namespace}.{parsed.name}"  # "ns.name", as lookups spell it
        if kind == "services":
            table = self.services
        elif kind == "endpointslices":
            table = self.slices
        else:
            return
        if isinstance(value, K8sObject):
            table[rest] = value
        else:
            table.pop(rest, None)
        self._services_dirty = True  # re-indexed at the next lookup: a sync of N objects costs O(N), not O(N²)

    def _index_services(self) -> None:
        """(ip, port) of every ClusterIP frontend and every ready backend -> (namespace, service)."""
        self.frontends, self.backends, self._services_dirty = {}, {}, False
        for svc in self.services.values():
            ips = svc.fields.get("clusterIPs") or [svc.fields.get("clusterIP")]
            for ip in ips:
                if not ip or ip == "None":
                    continue
                for port in svc.fields.get("ports") or []:
                    self.frontends[(ip, int(port.get("port", 0)))] = (svc.namespace, svc.name)
        for sl in self.slices.values():
            owner = sl.labels.get("kubernetes.io/service-name")
            if not owner:
                continue
            ports = [int(p["port"]) for p in sl.fields.get("ports") or [] if p.get("port")]
            for ep in sl.fields.get("endpoints") or []:
                for ip in ep.get("addresses") or []:
                    for port in ports:
                        self.backends[(ip, port)] = (sl.namespace, owner)

    # --- reading ---------------------------------------------------------------------------
    def endpoint(self, ip: str, identity: int, endpoint_id: int = 0) -> dict[str, Any]:
        """Hubble's Endpoint message for one side of a flow. Shared between flows of the same peer
        (cached until the bus changes anything): flows are read, never modified."""
        key = (ip, identity, endpoint_id)
        found = self._endpoint_cache.get(key)
        if found is None:
            if len(self._endpoint_cache) > 65536:
                self._endpoint_cache.clear()
            found = self._endpoint_cache[key] = self._endpoint(ip, identity, endpoint_id)
        return found

    def _endpoint(self, ip: str, identity: int, endpoint_id: int) -> dict[str, Any]:
        if not identity and ip in self.ipcache:  # the datapath did not know it: the bus may
            identity = next(iter(self.ipcache[ip].values()))
        out: dict[str, Any] = {"identity": identity}
        if endpoint_id:
            out["ID"] = endpoint_id
        info = self.endpoints_by_ip.get(ip)
        if info is not None:
            out.update(cluster_name=self.cluster_name, namespace=info.namespace, pod_name=info.pod_name,
                       labels=info.labels, workloads=info.workloads)
        elif identity in RESERVED_NAMES:
            out["labels"] = [f"reserved:{RESERVED_NAMES[identity]}"]
        elif identity in self.identities:
            labels = sorted(self.identities[identity])
            out["labels"] = labels
            cluster = next((lbl.split("=", 1)[1] for lbl in labels if lbl.startswith(f"k8s:{CLUSTER_LABEL}=")), "")
            if cluster:
                out["cluster_name"] = cluster
            ns = next((lbl.split("=", 1)[1] for lbl in labels
                       if lbl.startswith("k8s:io.kubernetes.pod.namespace=")), "")
            if ns:
                out["namespace"] = ns
        return out

    def service(self, ip: str, port: int) -> dict[str, str] | None:
        if self._services_dirty:
            self._index_services()
        found = self.frontends.get((ip, port)) or self.backends.get((ip, port))
        return {"name": found[1], "namespace": found[0]} if found else None


def _l4(e: ev.FlowEvent) -> dict[str, Any]:
    if e.protocol == 6:
        return {"TCP": {"source_port": e.src_port, "destination_port": e.dst_port,
                        "flags": {name: True for name in e.tcp_flag_names}}}
    if e.protocol == 17:
        return {"UDP": {"source_port": e.src_port, "destination_port": e.dst_port}}
    if e.protocol == 132:
        return {"SCTP": {"source_port": e.src_port, "destination_port": e.dst_port}}
    if e.protocol == 1:
        return {"ICMPv4": {"type": e.icmp_type, "code": e.icmp_code}}
    return {}


def summary(flow: Flow) -> str:
    """Hubble's `Summary`: the L4 headline `hubble observe` prints last on a compact line."""
    l4 = flow.get("l4") or {}
    if "TCP" in l4:
        flags = ", ".join(sorted(l4["TCP"].get("flags") or {}, key=lambda f: _TCP_ORDER.get(f, len(_TCP_ORDER))))
        return f"TCP Flags: {flags}" if flags else "TCP"
    if "UDP" in l4:
        return "UDP"
    if "ICMPv4" in l4:
        icmp = l4["ICMPv4"]
        return f"ICMPv4 {ICMP_TYPE_NAMES.get(icmp['type'], icmp['type'])}"
    if "SCTP" in l4:
        return "SCTP"
    return "IPv4" if flow.get("IP") else "not IPv4"


_TCP_ORDER = {name: i for i, (_, name) in enumerate(ev.TCP_FLAG_NAMES)}
_TCP_ORDER.update({"SYN": 0, "ACK": 1, "FIN": 2, "RST": 3, "PSH": 4})


def to_flow(e: ev.FlowEvent, *, node: str, enricher: Enricher) -> Flow:
    """One datapath event as a Hubble flow (L3/L4)."""
    local_is_src = e.direction == 2  # egress: the endpoint that emitted the event is the source
    src = enricher.endpoint(e.src_ip, e.src_identity, e.endpoint_id if local_is_src else 0)
    dst = enricher.endpoint(e.dst_ip, e.dst_identity, 0 if local_is_src else e.endpoint_id)
    has_ip = not (e.src_ip == e.dst_ip == "0.0.0.0")  # not IPv4 (e.g. an IPv6 frame dropped as unknown L3)
    ip: dict[str, Any] = {"source": e.src_ip, "destination": e.dst_ip, "ipVersion": "IPv4"} if has_ip else {}
    # a strict-mode drop is exactly a packet that did not go through the tunnel
    if (has_ip and enricher.wireguard_nodes and e.drop_reason != DROP_UNENCRYPTED_TRAFFIC
            and enricher.encrypted(node, e.src_ip, e.dst_ip)):
        ip["encrypted"] = True  # like `hubble observe -o json`, false is left out
    flow: Flow = {
        "time": rfc3339(e.wall_time),
        "verdict": ev.VERDICT_NAMES.get(e.verdict, "VERDICT_UNKNOWN"),
        "IP": ip,
        "l4": _l4(e) if has_ip else {},
        "source": src,
        "destination": dst,
        "Type": TYPE_L3_L4,
        "node_name": node,
        "event_type": {"type": e.type, "sub_type": e.subtype},
        "traffic_direction": ev.DIRECTION_NAMES.get(e.direction, "TRAFFIC_DIRECTION_UNKNOWN"),
        "is_reply": e.is_reply,
        "interface": {"index": e.ifindex},
    }
    for side, address in (("source", e.src_ip), ("destination", e.dst_ip)):
        if names := enricher.names(node, address):
            flow[f"{side}_names"] = names
    if e.type == ev.CILIUM_NOTIFY_DROP:
        flow["drop_reason"] = e.drop_reason
        flow["drop_reason_desc"] = reason_name(e.drop_reason)
    elif e.type == ev.CILIUM_NOTIFY_TRACE:
        flow["trace_observation_point"] = OBSERVATION_POINTS.get(e.subtype, "UNKNOWN_POINT")
        flow["trace_reason"] = ev.TRACE_REASON_NAMES.get(e.trace_reason, "TRACE_REASON_UNKNOWN")
    elif e.type == ev.CILIUM_NOTIFY_POLICY_VERDICT:
        flow["policy_match_type"] = e.match_type
        if e.verdict == 2:
            flow["drop_reason_desc"] = reason_name(e.drop_reason)
    ports = flow["l4"].get("TCP") or flow["l4"].get("UDP") or flow["l4"].get("SCTP")
    if ports:
        if (svc := enricher.service(e.dst_ip, e.dst_port)) is not None:
            flow["destination_service"] = svc
        if (svc := enricher.service(e.src_ip, e.src_port)) is not None:
            flow["source_service"] = svc
    flow["Summary"] = summary(flow)
    return flow


def enrich_proxy_flow(flow: Flow, enricher: Enricher) -> Flow:
    """A proxy's L7 flow (propolis.l7.flows) with both ends as Hubble's Endpoint messages (namespace,
    pod, labels), as the observer knows them."""
    ip = flow.get("IP") or {}
    for side, key in (("source", "source"), ("destination", "destination")):
        if ip.get(key):
            flow[side] = enricher.endpoint(ip[key], int((flow.get(side) or {}).get("identity") or 0))
    return flow


def protocol_of(flow: Flow) -> str:
    """Hubble's protocol name of a flow (metrics' `protocol` label, `--protocol` filter)."""
    l7 = flow.get("l7") or {}
    if "dns" in l7:
        return "DNS"
    if "http" in l7:
        return "HTTP"
    if "kafka" in l7:
        return "Kafka"
    l4 = flow.get("l4") or {}
    return next(iter(l4), "") if l4 else ""


def flow_ports(flow: Flow) -> tuple[int | None, int | None]:
    l4 = flow.get("l4") or {}
    for proto in ("TCP", "UDP", "SCTP"):
        if proto in l4:
            return l4[proto].get("source_port"), l4[proto].get("destination_port")
    return None, None
