"""cilium_runtime_config: per-node switches the programs read on every packet (ARRAY[1]).

Mirrors `struct runtime_config` in bpf/lib/maps.h: monitor aggregation (how many trace
events forwarded packets produce, Cilium's bpf.monitorAggregation levels) and which event
kinds are off (Cilium's bpf.events.{drop,policyVerdict,trace}.enabled), and the events
rate per endpoint (Cilium's bpf.events.default.rateLimit / burstLimit; 0 = no limit),
and encryption.strictMode (the CIDR whose unencrypted traffic cil_to_netdev drops).
"""

from __future__ import annotations

import ctypes
import ipaddress
import sys
from typing import Any

from propolis.errors import ValidationError
from propolis.maps import bpf
from propolis.maps.spec import MapSpec

MONITOR_AGGREGATION = {"none": 0, "low": 1, "medium": 2, "maximum": 3}
EVENTS_DISABLE_DROP = 1 << 0
EVENTS_DISABLE_POLICY_VERDICT = 1 << 1
EVENTS_DISABLE_TRACE = 1 << 2
ENCRYPT_F_STRICT_ALLOW_REMOTE_NODE = 1 << 0


class RuntimeConfig(ctypes.Structure):
    C_STRUCT = "runtime_config"
    _fields_ = [
        ("monitor_aggregation", ctypes.c_uint32),
        ("events_disabled", ctypes.c_uint32),
        ("events_rate_limit", ctypes.c_uint32),
        ("events_burst_limit", ctypes.c_uint32),
        ("strict_ipv4_net", ctypes.c_uint32),  # network byte order
        ("strict_ipv4_mask", ctypes.c_uint32),  # network byte order; 0 = strict mode off
        ("encrypt_flags", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


SPEC = MapSpec(
    pin_name="cilium_runtime_config",
    c_name="runtime_config",
    map_type=bpf.BPF_MAP_TYPE_ARRAY,
    key_type=ctypes.c_uint32,
    value_type=RuntimeConfig,
    max_entries=1,
    why_size="one record per node",
    c_value_struct="runtime_config",
)


def make_value(*, monitor_aggregation: str = "medium", drop_events: bool = True,
               policy_verdict_events: bool = True, trace_events: bool = True,
               events_rate_limit: int = 0, events_burst_limit: int = 0,
               strict_mode_cidr: str = "", strict_allow_remote_node_identities: bool = False) -> RuntimeConfig:
    """`strict_mode_cidr` empty = encryption.strictMode off."""
    if monitor_aggregation not in MONITOR_AGGREGATION:
        raise ValidationError("monitor_aggregation", f"{monitor_aggregation!r} is not one of {sorted(MONITOR_AGGREGATION)}")
    for name, limit in (("events_rate_limit", events_rate_limit), ("events_burst_limit", events_burst_limit)):
        if not 0 <= limit <= 10_000_000:
            raise ValidationError(name, f"{limit} is not 0 (no limit) .. 10000000 events per second")
    value = RuntimeConfig()
    value.events_rate_limit = events_rate_limit
    value.events_burst_limit = events_burst_limit
    value.monitor_aggregation = MONITOR_AGGREGATION[monitor_aggregation]
    value.events_disabled = ((0 if drop_events else EVENTS_DISABLE_DROP)
                             | (0 if policy_verdict_events else EVENTS_DISABLE_POLICY_VERDICT)
                             | (0 if trace_events else EVENTS_DISABLE_TRACE))
    if strict_mode_cidr:
        net = strict_cidr(strict_mode_cidr)
        value.strict_ipv4_net = _be32(net.network_address)
        value.strict_ipv4_mask = _be32(net.netmask)
        value.encrypt_flags = ENCRYPT_F_STRICT_ALLOW_REMOTE_NODE if strict_allow_remote_node_identities else 0
    return value


def strict_cidr(text: str) -> ipaddress.IPv4Network:
    """encryption.strictMode.cidr: an IPv4 CIDR with at least one prefix bit (/0 would drop all traffic)."""
    try:
        net = ipaddress.IPv4Network(text)
    except ValueError as exc:
        raise ValidationError("encryption_strict_mode_cidr", f"{text!r} is not an IPv4 CIDR: {exc}") from None
    if net.prefixlen == 0:
        raise ValidationError("encryption_strict_mode_cidr", f"{text} covers every address: name the pod CIDR")
    return net


def _be32(address: ipaddress.IPv4Address) -> int:
    """The address as the program compares it (network byte order in a native u32)."""
    return int.from_bytes(address.packed, sys.byteorder)


def decode(value: RuntimeConfig) -> dict[str, Any]:
    names = {v: k for k, v in MONITOR_AGGREGATION.items()}
    return {"monitor_aggregation": names.get(value.monitor_aggregation, str(value.monitor_aggregation)),
            "drop_events": not value.events_disabled & EVENTS_DISABLE_DROP,
            "policy_verdict_events": not value.events_disabled & EVENTS_DISABLE_POLICY_VERDICT,
            "trace_events": not value.events_disabled & EVENTS_DISABLE_TRACE,
            "events_rate_limit": value.events_rate_limit, "events_burst_limit": value.events_burst_limit,
            "strict_mode_cidr": _strict_text(value),
            "strict_allow_remote_node_identities": bool(value.encrypt_flags & ENCRYPT_F_STRICT_ALLOW_REMOTE_NODE)}


def _strict_text(value: RuntimeConfig) -> str:
    if not value.strict_ipv4_mask:
        return ""
    net, mask = (ipaddress.IPv4Address(v.to_bytes(4, sys.byteorder))
                 for v in (value.strict_ipv4_net, value.strict_ipv4_mask))
    return str(ipaddress.IPv4Network(f"{net}/{mask}"))
