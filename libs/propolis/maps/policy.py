"""Per-endpoint policy: cilium_ep_to_policy (HASH_OF_MAPS, endpoint id -> policy map) and one
LPM trie per endpoint pinned as cilium_policy_v2_<EPID 5 digits>, like Cilium.

Mirrors `struct policy_key` / `struct policy_entry` in bpf/lib/maps.h. Why map-in-map:
each endpoint's policy is its own small map, diffed and replaced without touching any
other endpoint, dumped alone by `propolis bpf policy get EPID`, and removed with the
endpoint; the datapath pays one outer lookup plus two LPM lookups per NEW connection.

This module also turns the policy compiler's abstract entries into map rows:
* protocol 0 = any protocol (prefix stops before it); protocol 0 with a port means the
  port on TCP, UDP and SCTP (Cilium's "ANY" with ports);
* port 0 = any port (prefix stops before the port); port..end_port becomes a few
  prefix-aligned port blocks;
* deny beats allow: an allow row covered by a deny row of the same identity becomes a
  deny row (the datapath handles deny across identity and "any identity" itself).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from propolis.errors import ValidationError
from propolis.maps import bpf
from propolis.maps.spec import MapSpec, htons, ntohs
from propolis.policy.entries import ICMP_TYPE_PORT_FLAG

POLICY_PREFIX_STATIC = 40   # sec_label (32) + egress (8): always exact
POLICY_PREFIX_PROTO = 8
POLICY_PREFIX_DPORT = 16
POLICY_PREFIX_FULL = POLICY_PREFIX_STATIC + POLICY_PREFIX_PROTO + POLICY_PREFIX_DPORT

POLICY_INGRESS = 0
POLICY_EGRESS = 1

POLICY_F_DENY = 1 << 0
POLICY_F_WILDCARD_PROTO = 1 << 1
POLICY_F_WILDCARD_DPORT = 1 << 2

PORT_PROTOCOLS = (6, 17, 132)  # what "any protocol" means when a port is given
PROTOCOL_NAMES = {0: "ANY", 1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}


class PolicyKey(ctypes.Structure):
    C_STRUCT = "policy_key"
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("sec_label", ctypes.c_uint32),
        ("egress", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("dport", ctypes.c_uint16),   # network order
    ]


class PolicyValue(ctypes.Structure):
    C_STRUCT = "policy_entry"
    _fields_ = [
        ("proxy_port", ctypes.c_uint16),  # network order
        ("flags", ctypes.c_uint8),
        ("auth_type", ctypes.c_uint8),
        ("prefix_len", ctypes.c_uint8),
        ("pad1", ctypes.c_uint8),
        ("pad2", ctypes.c_uint16),
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
    ]


INNER_SPEC = MapSpec(
    pin_name="cilium_policy_v2_{endpoint_id:05d}",
    c_name="policy_tmpl",
    map_type=bpf.BPF_MAP_TYPE_LPM_TRIE,
    key_type=PolicyKey,
    value_type=PolicyValue,
    max_entries=16384,
    why_size="Cilium's bpf.policyMapMax default (16k rows per endpoint); LPM allocates per entry",
    size_define="POLICY_MAP_SIZE",
    c_key_struct="policy_key",
    c_value_struct="policy_entry",
)

OUTER_SPEC = MapSpec(
    pin_name="cilium_ep_to_policy",
    c_name="ep_to_policy",
    map_type=bpf.BPF_MAP_TYPE_HASH_OF_MAPS,
    key_type=ctypes.c_uint32,
    value_type=ctypes.c_uint32,
    max_entries=65535,
    why_size="one slot per possible endpoint id (16 bit, as cilium_lxc)",
    size_define="POLICY_OUTER_MAP_SIZE",
)


def inner_pin_name(endpoint_id: int) -> str:
    return INNER_SPEC.pin_name.format(endpoint_id=endpoint_id)


class PolicyEntryLike(Protocol):
    """The policy compiler's abstract entry (propolis.datapath.PolicyEntry has this shape)."""

    @property
    def direction(self) -> str: ...
    @property
    def identity(self) -> int: ...
    @property
    def protocol(self) -> int: ...
    @property
    def port(self) -> int: ...
    @property
    def end_port(self) -> int: ...
    @property
    def deny(self) -> bool: ...
    @property
    def proxy_port(self) -> int: ...


@dataclass(frozen=True, order=True)
class PolicyRowKey:
    """A policy-map key as Python compares it (host byte order)."""

    sec_label: int
    egress: int
    prefixlen: int
    protocol: int
    dport: int

    def to_c(self) -> PolicyKey:
        key = PolicyKey()
        key.prefixlen = self.prefixlen
        key.sec_label = self.sec_label
        key.egress = self.egress
        key.protocol = self.protocol
        key.dport = htons(self.dport)
        return key

    @classmethod
    def from_c(cls, key: PolicyKey) -> PolicyRowKey:
        return cls(key.sec_label, key.egress, key.prefixlen, key.protocol, ntohs(key.dport))

    @property
    def port_bits(self) -> int:
        return max(0, self.prefixlen - POLICY_PREFIX_STATIC - POLICY_PREFIX_PROTO)

    @property
    def port_range(self) -> tuple[int, int] | None:
        """(first, last) port matched, None when any port."""
        if self.prefixlen <= POLICY_PREFIX_STATIC + POLICY_PREFIX_PROTO:
            return None
        span = 1 << (POLICY_PREFIX_DPORT - self.port_bits)
        return self.dport, self.dport + span - 1

    def covers(self, other: PolicyRowKey) -> bool:
        """True when every packet matching `other` also matches self (same identity/direction)."""
        if (self.sec_label, self.egress) != (other.sec_label, other.egress):
            return False
        if self.prefixlen > other.prefixlen:
            return False
        if self.prefixlen <= POLICY_PREFIX_STATIC:
            return True
        if self.protocol != other.protocol:
            return False
        mine = self.port_range
        if mine is None:
            return True
        theirs = other.port_range
        assert theirs is not None
        return mine[0] <= theirs[0] and theirs[1] <= mine[1]


@dataclass(frozen=True)
class PolicyRowValue:
    """A policy-map value without its counters."""

    deny: bool
    proxy_port: int
    flags: int
    prefix_len: int

    def to_c(self) -> PolicyValue:
        value = PolicyValue()
        value.proxy_port = htons(self.proxy_port)
        value.flags = self.flags
        value.prefix_len = self.prefix_len
        return value

    @classmethod
    def from_c(cls, value: PolicyValue) -> PolicyRowValue:
        return cls(bool(value.flags & POLICY_F_DENY), ntohs(value.proxy_port), value.flags, value.prefix_len)


def port_blocks(first: int, last: int) -> list[tuple[int, int]]:
    """Cover [first, last] with prefix-aligned blocks: [(start, prefix bits of 16)]."""
    blocks: list[tuple[int, int]] = []
    start = first
    while start <= last:
        size = start & -start if start else 1 << 16
        while start + size - 1 > last:
            size >>= 1
        blocks.append((start, 16 - (size.bit_length() - 1)))
        start += size
    return blocks


def _validate(entry: PolicyEntryLike, where: str) -> None:
    if entry.direction not in ("ingress", "egress"):
        raise ValidationError(f"{where}.direction", f"must be 'ingress' or 'egress', not {entry.direction!r}")
    if not 0 <= entry.identity < 2**32:
        raise ValidationError(f"{where}.identity", f"{entry.identity} out of range")
    if not 0 <= entry.protocol <= 255:
        raise ValidationError(f"{where}.protocol", f"{entry.protocol} out of range")
    if not 0 <= entry.port <= 65535:
        raise ValidationError(f"{where}.port", f"{entry.port} out of range")
    if entry.end_port and not entry.port <= entry.end_port <= 65535:
        raise ValidationError(f"{where}.end_port", f"{entry.end_port} must be >= port ({entry.port}) and <= 65535")
    if entry.end_port and not entry.port:
        raise ValidationError(f"{where}.end_port", "a range needs a start port")
    if not 0 <= entry.proxy_port <= 65535:
        raise ValidationError(f"{where}.proxy_port", f"{entry.proxy_port} out of range")


def expand_entry(entry: PolicyEntryLike) -> list[tuple[PolicyRowKey, PolicyRowValue]]:
    """One abstract entry -> its map rows (before deny precedence)."""
    egress = POLICY_EGRESS if entry.direction == "egress" else POLICY_INGRESS
    flags_deny = POLICY_F_DENY if entry.deny else 0
    proxy = 0 if entry.deny else entry.proxy_port
    rows: list[tuple[PolicyRowKey, PolicyRowValue]] = []
    if entry.protocol == 0 and entry.port == 0:
        key = PolicyRowKey(entry.identity, egress, POLICY_PREFIX_STATIC, 0, 0)
        flags = flags_deny | POLICY_F_WILDCARD_PROTO | POLICY_F_WILDCARD_DPORT
        return [(key, PolicyRowValue(entry.deny, proxy, flags, 0))]
    protocols = [entry.protocol] if entry.protocol else list(PORT_PROTOCOLS)
    for protocol in protocols:
        if entry.port == 0:
            key = PolicyRowKey(entry.identity, egress, POLICY_PREFIX_STATIC + POLICY_PREFIX_PROTO, protocol, 0)
            rows.append((key, PolicyRowValue(entry.deny, proxy, flags_deny | POLICY_F_WILDCARD_DPORT,
                                             POLICY_PREFIX_PROTO)))
            continue
        last = entry.end_port or entry.port
        for start, bits in port_blocks(entry.port, last):
            prefix = POLICY_PREFIX_STATIC + POLICY_PREFIX_PROTO + bits
            key = PolicyRowKey(entry.identity, egress, prefix, protocol, start)
            rows.append((key, PolicyRowValue(entry.deny, proxy, flags_deny, POLICY_PREFIX_PROTO + bits)))
    return rows


def _merge(old: PolicyRowValue, new: PolicyRowValue) -> PolicyRowValue:
    """Two entries produced the same key: deny wins; else an L7 redirect wins (lowest port)."""
    if old.deny or new.deny:
        return old if old.deny else new
    if old.proxy_port and new.proxy_port:
        return old if old.proxy_port <= new.proxy_port else new
    return old if old.proxy_port else new


def compute_rows(entries: Iterable[PolicyEntryLike]) -> dict[PolicyRowKey, PolicyRowValue]:
    """Abstract entries -> the exact rows the endpoint's policy map must hold."""
    rows: dict[PolicyRowKey, PolicyRowValue] = {}
    for index, entry in enumerate(entries):
        _validate(entry, f"entries[{index}]")
        for key, value in expand_entry(entry):
            rows[key] = _merge(rows[key], value) if key in rows else value
    # Deny precedence inside one identity: an allow covered by a deny becomes a deny,
    # otherwise its longer prefix would win the LPM lookup.
    denies: dict[tuple[int, int], list[PolicyRowKey]] = {}
    for key, value in rows.items():
        if value.deny:
            denies.setdefault((key.sec_label, key.egress), []).append(key)
    if denies:
        for key, value in list(rows.items()):
            if value.deny:
                continue
            for deny_key in denies.get((key.sec_label, key.egress), ()):
                if deny_key.covers(key):
                    rows[key] = PolicyRowValue(True, 0, (value.flags | POLICY_F_DENY), value.prefix_len)
                    break
    return rows


@dataclass
class PolicyDiff:
    """What a reconcile of one endpoint's policy map changed."""

    added: int = 0
    updated: int = 0
    deleted: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.deleted)


def read_rows(bpf_map: bpf.BpfMap[Any, Any]) -> dict[PolicyRowKey, tuple[PolicyRowValue, int, int]]:
    """Current rows with their (packets, bytes) counters."""
    return {PolicyRowKey.from_c(k): (PolicyRowValue.from_c(v), v.packets, v.bytes) for k, v in bpf_map.items()}


def apply_rows(bpf_map: bpf.BpfMap[Any, Any], desired: dict[PolicyRowKey, PolicyRowValue],
               actual: dict[PolicyRowKey, PolicyRowValue] | None = None) -> PolicyDiff:
    """Make the map hold exactly `desired`, writing only the difference.

    `actual` is what the caller knows the map holds (its last write); None = read the map.

    Order keeps every intermediate state no more permissive than needed: new/changed
    denies first, then stale allows go, then new/changed allows, then stale denies.
    """
    if actual is None:
        actual = {key: row[0] for key, row in read_rows(bpf_map).items()}
    diff = PolicyDiff()

    def upsert(key: PolicyRowKey, value: PolicyRowValue) -> None:
        if key in actual:
            diff.updated += 1
        else:
            diff.added += 1
        bpf_map.update(key.to_c(), value.to_c())

    changed = {k: v for k, v in desired.items() if actual.get(k) != v}
    stale = [k for k in actual if k not in desired]
    for key, value in changed.items():
        if value.deny:
            upsert(key, value)
    for key in stale:
        if not actual[key].deny:
            diff.deleted += bpf_map.delete(key.to_c())
    for key, value in changed.items():
        if not value.deny:
            upsert(key, value)
    for key in stale:
        if actual[key].deny:
            diff.deleted += bpf_map.delete(key.to_c())
    return diff


def describe_row(key: PolicyRowKey, value: PolicyRowValue, packets: int = 0, nbytes: int = 0) -> dict[str, Any]:
    """One row as `cilium bpf policy get` shows it (JSON-ready)."""
    port_range = key.port_range
    if key.prefixlen <= POLICY_PREFIX_STATIC:
        port = "ANY"
    elif port_range is None:
        port = f"ANY/{PROTOCOL_NAMES.get(key.protocol, key.protocol)}"
    else:
        first, last = port_range
        if key.protocol in (1, 58) and first == last and first & ICMP_TYPE_PORT_FLAG:
            first = last = first & 0xFF  # an ICMP type (icmp_type_port), shown as Cilium does: 8/ICMP
        ports = str(first) if first == last else f"{first}-{last}"
        port = f"{ports}/{PROTOCOL_NAMES.get(key.protocol, key.protocol)}"
    return {
        "policy": "Deny" if value.deny else "Allow",
        "direction": "Egress" if key.egress == POLICY_EGRESS else "Ingress",
        "identity": key.sec_label,
        "port_protocol": port,
        "proxy_port": value.proxy_port or "NONE",
        "packets": packets,
        "bytes": nbytes,
        "prefix": key.prefixlen,
    }
