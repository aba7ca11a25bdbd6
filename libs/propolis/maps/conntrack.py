"""Conntrack: cilium_ct4_global (TCP) and cilium_ct_any4_global (UDP, ICMP, others), LRU hashes.

Mirrors `struct ipv4_ct_tuple` / `struct ct_entry` in bpf/lib/maps.h. Keys hold the
original tuple of a connection and the side that created the entry (CT_EGRESS: the local
pod opened it; CT_INGRESS: it came in to the local pod). Lifetimes are seconds on the
CLOCK_MONOTONIC scale (bpf_ktime_get_ns), so `time.monotonic()` tells what expired.
Show it: `propolis bpf ct list`.
"""

from __future__ import annotations

import ctypes
import struct
import time
from dataclasses import dataclass
from typing import Any

from propolis.maps import bpf
from propolis.maps.spec import MapSpec, be32_to_ip4, ip4_to_be32, ntohs

CT_EGRESS = 0
CT_INGRESS = 1
CT_SERVICE = 4

CT_F_TX_CLOSING = 1 << 0
CT_F_RX_CLOSING = 1 << 1
CT_F_SEEN_NON_SYN = 1 << 2

# Cilium's lifetimes (seconds), as compiled into bpf/lib/conntrack.h
CT_CONNECTION_LIFETIME_TCP = 8000
CT_SYN_TIMEOUT = 60
CT_CLOSE_TIMEOUT = 10
CT_CONNECTION_LIFETIME_NONTCP = 60


class CtTuple4(ctypes.Structure):
    C_STRUCT = "ipv4_ct_tuple"
    _fields_ = [
        ("daddr", ctypes.c_uint32),
        ("saddr", ctypes.c_uint32),
        ("dport", ctypes.c_uint16),
        ("sport", ctypes.c_uint16),
        ("nexthdr", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
    ]


class CtEntry(ctypes.Structure):
    C_STRUCT = "ct_entry"
    _fields_ = [
        ("rx_packets", ctypes.c_uint64),
        ("rx_bytes", ctypes.c_uint64),
        ("tx_packets", ctypes.c_uint64),
        ("tx_bytes", ctypes.c_uint64),
        ("lifetime", ctypes.c_uint32),
        ("flags", ctypes.c_uint16),
        ("rev_nat_index", ctypes.c_uint16),
        ("ifindex", ctypes.c_uint16),
        ("tx_flags_seen", ctypes.c_uint8),
        ("rx_flags_seen", ctypes.c_uint8),
        ("src_sec_id", ctypes.c_uint32),
        ("last_tx_report", ctypes.c_uint32),
        ("last_rx_report", ctypes.c_uint32),
        ("proxy_port", ctypes.c_uint16),
        ("endpoint_id", ctypes.c_uint16),
        ("dst_sec_id", ctypes.c_uint32),
    ]


TCP_SPEC = MapSpec(
    pin_name="cilium_ct4_global",
    c_name="ct4_global",
    map_type=bpf.BPF_MAP_TYPE_LRU_HASH,
    key_type=CtTuple4,
    value_type=CtEntry,
    max_entries=65536,
    why_size=("LRU maps are preallocated (~130 B/entry): 64k TCP connections per node is 8 MiB, "
              "enough for the sandbox's several nodes on one machine; Cilium's default is 512k"),
    size_define="CT_MAP_SIZE_TCP",
    c_key_struct="ipv4_ct_tuple",
    c_value_struct="ct_entry",
)

ANY_SPEC = MapSpec(
    pin_name="cilium_ct_any4_global",
    c_name="ct_any4_global",
    map_type=bpf.BPF_MAP_TYPE_LRU_HASH,
    key_type=CtTuple4,
    value_type=CtEntry,
    max_entries=32768,
    why_size="half the TCP map, as Cilium's 256k/512k split; preallocated like it",
    size_define="CT_MAP_SIZE_ANY",
    c_key_struct="ipv4_ct_tuple",
    c_value_struct="ct_entry",
)

PROTOCOL_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 132: "SCTP"}


def now_seconds() -> int:
    """The datapath's clock (bpf_ktime_get_ns is CLOCK_MONOTONIC), in seconds."""
    return int(time.monotonic())


@dataclass(frozen=True)
class GcResult:
    """One GC pass over one conntrack map."""

    map_name: str
    protocol: str  # "TCP" | "non-TCP", Cilium's metric label
    deleted: int
    alive: int
    max_entries: int


@dataclass(frozen=True)
class CtRow:
    """One conntrack entry, decoded."""

    protocol: int
    side: int
    src: str
    sport: int
    dst: str
    dport: int
    expires_in: int
    flags: int
    tx_packets: int
    tx_bytes: int
    rx_packets: int
    rx_bytes: int
    src_identity: int
    dst_identity: int
    endpoint_id: int
    proxy_port: int

    @property
    def closing(self) -> bool:
        return bool(self.flags & (CT_F_TX_CLOSING | CT_F_RX_CLOSING))

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_NAMES.get(self.protocol, str(self.protocol)),
            "direction": "OUT" if self.side == CT_EGRESS else "IN" if self.side == CT_INGRESS else str(self.side),
            "source": f"{self.src}:{self.sport}", "destination": f"{self.dst}:{self.dport}",
            "expires_in": self.expires_in, "closing": self.closing,
            "tx_packets": self.tx_packets, "tx_bytes": self.tx_bytes,
            "rx_packets": self.rx_packets, "rx_bytes": self.rx_bytes,
            "src_identity": self.src_identity, "dst_identity": self.dst_identity,
            "endpoint_id": self.endpoint_id, "proxy_port": self.proxy_port,
        }


def decode(key: CtTuple4, value: CtEntry, now: int | None = None) -> CtRow:
    now = now_seconds() if now is None else now
    return CtRow(
        protocol=key.nexthdr, side=key.flags, src=be32_to_ip4(key.saddr), sport=ntohs(key.sport),
        dst=be32_to_ip4(key.daddr), dport=ntohs(key.dport), expires_in=int(value.lifetime) - now,
        flags=value.flags, tx_packets=value.tx_packets, tx_bytes=value.tx_bytes,
        rx_packets=value.rx_packets, rx_bytes=value.rx_bytes, src_identity=value.src_sec_id,
        dst_identity=value.dst_sec_id, endpoint_id=value.endpoint_id, proxy_port=ntohs(value.proxy_port))


def dump(bpf_map: bpf.BpfMap[Any, Any]) -> list[CtRow]:
    now = now_seconds()
    return [decode(k, v, now) for k, v in bpf_map.items()]


def keys_naming(raw_keys: bytes, ip: str) -> list[bytes]:
    """The `ipv4_ct_tuple` keys, packed back to back in `raw_keys`, that have `ip` as source or
    destination (endpoint scrub). bytes.find does the scanning: 50k keys in well under a ms."""
    addr = struct.pack("=I", ip4_to_be32(ip))
    size = ctypes.sizeof(CtTuple4)
    found: dict[int, bytes] = {}
    pos = raw_keys.find(addr)
    while pos >= 0:
        start, offset = divmod(pos, size)
        if offset in (0, 4):  # daddr, saddr
            found[start] = raw_keys[start * size:(start + 1) * size]
        pos = raw_keys.find(addr, pos + 1)
    return list(found.values())


def gc(bpf_map: bpf.BpfMap[Any, Any]) -> int:
    """Delete expired entries (the datapath already ignores them); returns how many."""
    return gc_counts(bpf_map)[0]


def flush(bpf_map: bpf.BpfMap[Any, Any]) -> int:
    """Delete every entry (`cilium bpf ct flush`); returns how many. Batch syscalls."""
    from propolis.maps import lb  # lb's key types build on this module's

    batches = [(raw_keys, count) for raw_keys, _, count in lb.raw_batches(bpf_map) if count]
    for raw_keys, count in batches:
        lb.delete_batch(bpf_map, raw_keys, count)
    return sum(count for _, count in batches)


def gc_counts(bpf_map: bpf.BpfMap[Any, Any]) -> tuple[int, int]:
    """Delete expired entries; returns (deleted, alive) for the GC's metric and its next interval."""
    now = now_seconds()
    removed = alive = 0
    for key, value in list(bpf_map.items()):
        if value.lifetime < now:
            removed += bpf_map.delete(key)
        else:
            alive += 1
    return removed, alive
