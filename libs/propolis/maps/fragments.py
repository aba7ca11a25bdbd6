"""cilium_ipv4_frag_datagrams: fragment id -> the datagram's L4 ports (LRU hash).

Mirrors `struct ipv4_frag_id` / `struct ipv4_frag_l4ports` in bpf/lib/maps.h. Only the
first fragment of an IPv4 datagram carries the TCP/UDP header; the datapath remembers its
ports under (addresses, IP id, protocol) so later fragments meet conntrack and policy as
the same flow (Cilium's map and size). A later fragment whose first was never seen is
dropped with FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND.
"""

from __future__ import annotations

import ctypes

from propolis.maps import bpf
from propolis.maps.spec import MapSpec


class FragId4(ctypes.Structure):
    C_STRUCT = "ipv4_frag_id"
    _fields_ = [
        ("daddr", ctypes.c_uint32),
        ("saddr", ctypes.c_uint32),
        ("id", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class FragL4Ports(ctypes.Structure):
    C_STRUCT = "ipv4_frag_l4ports"
    _fields_ = [
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("policy_port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    ]


SPEC = MapSpec(
    pin_name="cilium_ipv4_frag_datagrams",
    c_name="frag4_datagrams",
    map_type=bpf.BPF_MAP_TYPE_LRU_HASH,
    key_type=FragId4,
    value_type=FragL4Ports,
    max_entries=8192,
    why_size=("Cilium's size: datagrams in flight between their first and last fragment are few; "
              "an entry is only needed for milliseconds, LRU reuses the rest"),
    size_define="FRAG_MAP_SIZE",
    c_key_struct="ipv4_frag_id",
    c_value_struct="ipv4_frag_l4ports",
)
