"""What `cilium_wg0` on one node should look like, computed from the bus (pure; no I/O).

Inputs: the mirrored Nodes (InternalIP, podCIDRs; k8s bucket) and every node's
published public key (`WireguardNodeKey`, wireguard bucket). Output: one peer
per other node (endpoint = its InternalIP:port, allowed IPs = its pod CIDRs and
its InternalIP), one route per other node's pod CIDR through the device, and the
nodes refused with the reason (malformed or foreign key, duplicate key, no
InternalIP). The InternalIP is allowed unconditionally, as Cilium does since
1.16: a NodePort reply from a backend on that node carries the node's IP as its
source and arrives through the tunnel (it is routed by its pod destination), so
without it WireGuard drops the reply. Allowed IPs only say what a peer may send
and be sent; what enters the device is the routes' choice. With
`encryption.nodeEncryption`, `encrypted_routes` (the policy-routed table node
traffic meets first) sends every other node's InternalIP and pod CIDRs into the
device.

A refused node gets no peer, but its pod CIDR is still routed into the device:
with no peer owning those addresses WireGuard drops the packets, so traffic to
a node whose key is wrong fails closed instead of leaving in cleartext.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from propolis.bus.messages import K8sObject, WireguardNodeKey
from propolis.encryption import keys
from propolis.encryption.uapi import PeerConfig
from propolis.errors import ValidationError


@dataclass(frozen=True)
class NodeInfo:
    name: str
    internal_ip: str
    pod_cidrs: tuple[str, ...]


def node_info(obj: K8sObject) -> NodeInfo:
    """A mirrored Node -> what WireGuard needs of it."""
    addresses = obj.status.get("addresses") or []
    internal = next((a.get("address", "") for a in addresses if a.get("type") == "InternalIP"), "")
    cidrs = list(obj.fields.get("podCIDRs") or [])
    if not cidrs and obj.fields.get("podCIDR"):
        cidrs = [obj.fields["podCIDR"]]
    return NodeInfo(obj.name, internal, tuple(cidrs))


@dataclass
class DesiredDevice:
    peers: dict[str, PeerConfig] = field(default_factory=dict)  # public key (base64) -> peer
    routes: dict[str, str] = field(default_factory=dict)  # pod CIDR -> node it belongs to
    #: nodeEncryption: node IP/32 and pod CIDR -> node, in the WireGuard routing table (empty without it)
    encrypted_routes: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # node -> why it has no peer


def compute(*, own_node: str, nodes: dict[str, NodeInfo], node_keys: dict[str, Any],
            persistent_keepalive: int = 0, node_encryption: bool = False) -> DesiredDevice:
    """``node_keys`` maps the bucket key (node name) to its decoded value (anything: it is validated here);
    a peer's endpoint port is the one its node published."""
    out = DesiredDevice()
    valid: dict[str, str] = {}  # node -> public key
    for name, value in node_keys.items():
        try:
            valid[name] = _validate_key(name, value)
        except ValidationError as exc:
            if name != own_node:
                out.refused[name] = str(exc)
    holders: dict[str, list[str]] = {}
    for name, pub in valid.items():
        holders.setdefault(pub, []).append(name)
    for pub, names in holders.items():
        if len(names) > 1:
            for name in names:
                if name != own_node:
                    others = ", ".join(n for n in sorted(names) if n != name)
                    out.refused[name] = f"public key {pub} is also published by {others}: duplicate key refused"
    for name, info in sorted(nodes.items()):
        if name == own_node:
            continue
        for cidr in info.pod_cidrs:
            out.routes[cidr] = name
        node_ip = _node_ip_cidr(info)
        if node_encryption:  # a refused node's too: its traffic fails closed in the device
            out.encrypted_routes.update({cidr: name for cidr in info.pod_cidrs})
            if node_ip:
                out.encrypted_routes[node_ip] = name
        if name in out.refused or name not in valid:
            continue
        if not node_ip:
            out.refused[name] = f"node has no usable InternalIP ({info.internal_ip!r}): no endpoint for its peer"
            continue
        if not info.pod_cidrs:
            out.refused[name] = "node has no podCIDR: nothing to route to its peer"
            continue
        port = node_keys[name].listen_port
        allowed = (*info.pod_cidrs, node_ip)
        out.peers[valid[name]] = PeerConfig(valid[name], f"{info.internal_ip}:{port}", allowed,
                                            persistent_keepalive, name)
    return out


def _node_ip_cidr(info: NodeInfo) -> str:
    """The node's InternalIP as a /32, or "" when it has none usable."""
    try:
        return f"{ipaddress.IPv4Address(info.internal_ip)}/32"
    except ValueError:
        return ""


def _validate_key(name: str, value: Any) -> str:
    if not isinstance(value, WireguardNodeKey):
        raise ValidationError("public_key", f"undecodable entry ({type(value).__name__})")
    if value.node != name:
        raise ValidationError("node", f"foreign key: the entry of node {name} carries the key of node {value.node!r}")
    keys.decode(value.public_key, what="public key")
    if not 0 < value.listen_port < 65536:
        raise ValidationError("listen_port", f"{value.listen_port} is not a UDP port")
    return value.public_key
