"""What every map module declares (pin name, C names, type, size and why) plus the address
helpers the key structs share.

Why a spec object: the loader passes the sizes to the C compile (-D), the layout test walks
every spec against bcc's Key/Leaf, and the CLI and `remove_all` find pins by name, all
from this one description per map.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from propolis.maps.bpf import PERCPU_TYPES, BpfMap

DEFAULT_BPFFS_ROOT = "/sys/fs/bpf/propolis"

ENDPOINT_KEY_IPV4 = 1
ENDPOINT_KEY_IPV6 = 2


def default_pin_dir(node: str) -> str:
    """Per-node pin directory: /sys/fs/bpf/propolis/<node>."""
    return os.path.join(DEFAULT_BPFFS_ROOT, node)


@dataclass(frozen=True)
class MapSpec:
    """One BPF map as both sides know it."""

    pin_name: str            # file name under the node's pin dir (Cilium's name)
    c_name: str              # variable name in bpf/lib/maps.h (bcc table name, <= 15 chars)
    map_type: int            # BPF_MAP_TYPE_*
    key_type: type[Any]
    value_type: type[Any]
    max_entries: int
    why_size: str            # why max_entries is what it is
    size_define: str | None = None   # -D name that sets max_entries in C
    c_key_struct: str = ""   # C struct names the ctypes classes mirror
    c_value_struct: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def percpu(self) -> bool:
        return self.map_type in PERCPU_TYPES

    def path(self, pin_dir: str) -> str:
        return os.path.join(pin_dir, self.pin_name)

    def open(self, pin_dir: str) -> BpfMap[Any, Any]:
        """Open the pinned map of a node (FileNotFoundError if the node never loaded)."""
        return BpfMap.open_pinned(self.path(pin_dir), self.key_type, self.value_type, percpu=self.percpu)


class L3Addr(ctypes.Union):
    """C `union l3addr`: IPv4 in the first 4 bytes (network order), room for IPv6."""

    C_STRUCT = "l3addr"
    _fields_ = [("ip4", ctypes.c_uint32), ("ip6", ctypes.c_uint8 * 16)]


def ip4_to_be32(ip: str) -> int:
    """Dotted IPv4 -> the u32 whose memory bytes are the address in network order."""
    return int(struct.unpack("=I", socket.inet_aton(str(ipaddress.IPv4Address(ip))))[0])


def be32_to_ip4(value: int) -> str:
    return socket.inet_ntoa(struct.pack("=I", value))


def htons(port: int) -> int:
    return socket.htons(port)


def ntohs(port: int) -> int:
    return socket.ntohs(port)
