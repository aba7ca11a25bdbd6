"""cilium_ipcache: IP/prefix -> security identity (LPM trie), for every address the node
may talk to: pods anywhere in the cluster, nodes, CIDR identities.

Mirrors `struct ipcache_key` / `struct remote_endpoint_info` in bpf/lib/maps.h. The
programs use it for the peer identity (no match = reserved:world). `tunnel_endpoint` is
kept for later cross-node routing/encryption. Show it: `propolis bpf ipcache list`.
"""

from __future__ import annotations

import ctypes
import ipaddress
from dataclasses import dataclass
from typing import Any

from propolis.errors import ValidationError
from propolis.maps import bpf
from propolis.maps.spec import ENDPOINT_KEY_IPV4, L3Addr, MapSpec, be32_to_ip4, ip4_to_be32
from propolis.model.types import NumericIdentity

IPCACHE_PREFIX_STATIC = 32  # cluster_id + pad1 + family, always matched
IPCACHE_F_SKIP_TUNNEL = 1 << 0
IPCACHE_F_HAS_TUNNEL_EP = 1 << 1


class IPCacheKey(ctypes.Structure):
    C_STRUCT = "ipcache_key"
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("cluster_id", ctypes.c_uint16),
        ("pad1", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("addr", L3Addr),
    ]


class RemoteEndpointInfo(ctypes.Structure):
    C_STRUCT = "remote_endpoint_info"
    _fields_ = [
        ("sec_identity", ctypes.c_uint32),
        ("tunnel_endpoint", L3Addr),
        ("pad", ctypes.c_uint16),
        ("key", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
    ]


SPEC = MapSpec(
    pin_name="cilium_ipcache",
    c_name="cilium_ipcache",
    map_type=bpf.BPF_MAP_TYPE_LPM_TRIE,
    key_type=IPCacheKey,
    value_type=RemoteEndpointInfo,
    max_entries=512000,
    why_size="Cilium's documented limit (512k IPs/CIDRs cluster-wide); LPM tries allocate per entry",
    size_define="IPCACHE_MAP_SIZE",
    c_key_struct="ipcache_key",
    c_value_struct="remote_endpoint_info",
)


@dataclass(frozen=True)
class IPCacheEntry:
    """Desired ipcache row: an IP or CIDR ("10.244.1.5", "10.0.0.0/8") -> identity."""

    cidr: str
    identity: NumericIdentity
    tunnel_endpoint: str | None = None

    def normalized(self) -> IPCacheEntry:
        try:
            net = ipaddress.ip_network(self.cidr, strict=False)
        except ValueError as exc:
            raise ValidationError("cidr", f"{self.cidr!r} is not an IP or CIDR: {exc}") from None
        if net.version != 4:
            raise ValidationError("cidr", f"{self.cidr}: only IPv4 is supported yet")
        if not 0 < self.identity < 2**32:
            raise ValidationError("identity", f"{self.identity} is not a valid identity")
        return IPCacheEntry(str(net), self.identity, self.tunnel_endpoint)

    def to_json(self) -> dict[str, Any]:
        return {"cidr": self.cidr, "identity": self.identity, "tunnel_endpoint": self.tunnel_endpoint}


def make_key(cidr: str) -> IPCacheKey:
    net = ipaddress.ip_network(cidr, strict=False)
    key = IPCacheKey()
    key.prefixlen = IPCACHE_PREFIX_STATIC + net.prefixlen
    key.family = ENDPOINT_KEY_IPV4
    key.addr.ip4 = ip4_to_be32(str(net.network_address))
    return key


def make_value(entry: IPCacheEntry) -> RemoteEndpointInfo:
    value = RemoteEndpointInfo()
    value.sec_identity = entry.identity
    if entry.tunnel_endpoint:
        value.tunnel_endpoint.ip4 = ip4_to_be32(entry.tunnel_endpoint)
        value.flags |= IPCACHE_F_HAS_TUNNEL_EP
    return value


def decode(key: IPCacheKey, value: RemoteEndpointInfo) -> IPCacheEntry:
    cidr = f"{be32_to_ip4(key.addr.ip4)}/{key.prefixlen - IPCACHE_PREFIX_STATIC}"
    tunnel = be32_to_ip4(value.tunnel_endpoint.ip4) if value.flags & IPCACHE_F_HAS_TUNNEL_EP else None
    return IPCacheEntry(cidr, NumericIdentity(value.sec_identity), tunnel)


def dump(bpf_map: bpf.BpfMap[Any, Any]) -> list[IPCacheEntry]:
    rows = [decode(k, v) for k, v in bpf_map.items() if k.family == ENDPOINT_KEY_IPV4]
    return sorted(rows, key=lambda e: ipaddress.ip_network(e.cidr))
