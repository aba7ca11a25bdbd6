"""cilium_lxc: local endpoint IP -> endpoint id, identity, lxc ifindex, flags.

Mirrors `struct endpoint_key` / `struct endpoint_info` in bpf/lib/maps.h. Both programs
look the local pod up here by its address and check it owns the interface the packet is
on; the per-direction enforcement flags live here too, so turning enforcement on or off
is one map write. Show it: `propolis bpf endpoint list`.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from propolis.maps import bpf
from propolis.maps.spec import ENDPOINT_KEY_IPV4, L3Addr, MapSpec, be32_to_ip4, ip4_to_be32

ENDPOINT_F_HOST = 1 << 0
ENDPOINT_F_INGRESS_ENFORCED = 1 << 8
ENDPOINT_F_EGRESS_ENFORCED = 1 << 9
ENDPOINT_F_POLICY_AUDIT = 1 << 10  # policy audit mode: would-be drops reported as AUDIT and forwarded
#: the node's own endpoint (hostFirewall): the top id, so pods allocated from 1 upward never meet it
HOST_ENDPOINT_ID = 65535


class EndpointKey(ctypes.Structure):
    C_STRUCT = "endpoint_key"
    _fields_ = [
        ("addr", L3Addr),
        ("family", ctypes.c_uint8),
        ("key", ctypes.c_uint8),
        ("cluster_id", ctypes.c_uint16),
    ]


class EndpointInfo(ctypes.Structure):
    C_STRUCT = "endpoint_info"
    _fields_ = [
        ("ifindex", ctypes.c_uint32),
        ("unused", ctypes.c_uint16),
        ("lxc_id", ctypes.c_uint16),
        ("flags", ctypes.c_uint32),
        ("sec_id", ctypes.c_uint32),
        ("mac", ctypes.c_uint8 * 8),
        ("node_mac", ctypes.c_uint8 * 8),
    ]


SPEC = MapSpec(
    pin_name="cilium_lxc",
    c_name="cilium_lxc",
    map_type=bpf.BPF_MAP_TYPE_HASH,
    key_type=EndpointKey,
    value_type=EndpointInfo,
    max_entries=65535,
    why_size="Cilium's default: endpoint ids are 16 bit; entries are allocated on demand (NO_PREALLOC)",
    size_define="ENDPOINTS_MAP_SIZE",
    c_key_struct="endpoint_key",
    c_value_struct="endpoint_info",
)


@dataclass(frozen=True)
class EndpointEntry:
    """One row of cilium_lxc, as Python sees it."""

    ip: str
    endpoint_id: int
    identity: int
    ifindex: int
    ingress_enforced: bool
    egress_enforced: bool
    flags: int = 0
    policy_audit: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"address": self.ip, "endpoint_id": self.endpoint_id, "identity": self.identity,
                "ifindex": self.ifindex, "ingress_enforced": self.ingress_enforced,
                "egress_enforced": self.egress_enforced, "policy_audit": self.policy_audit, "flags": self.flags}


def make_key(ip: str) -> EndpointKey:
    key = EndpointKey()
    key.addr.ip4 = ip4_to_be32(ip)
    key.family = ENDPOINT_KEY_IPV4
    return key


def make_value(entry: EndpointEntry) -> EndpointInfo:
    flags = entry.flags & ~(ENDPOINT_F_INGRESS_ENFORCED | ENDPOINT_F_EGRESS_ENFORCED | ENDPOINT_F_POLICY_AUDIT)
    if entry.policy_audit:
        flags |= ENDPOINT_F_POLICY_AUDIT
    if entry.ingress_enforced:
        flags |= ENDPOINT_F_INGRESS_ENFORCED
    if entry.egress_enforced:
        flags |= ENDPOINT_F_EGRESS_ENFORCED
    value = EndpointInfo()
    value.ifindex = entry.ifindex
    value.lxc_id = entry.endpoint_id
    value.flags = flags
    value.sec_id = entry.identity
    return value


def decode(key: EndpointKey, value: EndpointInfo) -> EndpointEntry:
    return EndpointEntry(
        ip=be32_to_ip4(key.addr.ip4), endpoint_id=value.lxc_id, identity=value.sec_id,
        ifindex=value.ifindex, ingress_enforced=bool(value.flags & ENDPOINT_F_INGRESS_ENFORCED),
        egress_enforced=bool(value.flags & ENDPOINT_F_EGRESS_ENFORCED), flags=value.flags,
        policy_audit=bool(value.flags & ENDPOINT_F_POLICY_AUDIT))


def dump(bpf_map: bpf.BpfMap[Any, Any]) -> list[EndpointEntry]:
    rows = [decode(k, v) for k, v in bpf_map.items() if k.family == ENDPOINT_KEY_IPV4]
    return sorted(rows, key=lambda e: e.endpoint_id)
