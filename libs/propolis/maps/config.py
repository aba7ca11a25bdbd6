"""cilium_runtime_config: per-node switches the programs read on every packet (ARRAY[1]).

Mirrors `struct runtime_config` in bpf/lib/maps.h: monitor aggregation (how many trace
events forwarded packets produce, Cilium's bpf.monitorAggregation levels) and which event
kinds are off (Cilium's bpf.events.{drop,policyVerdict,trace}.enabled), and the events
rate per endpoint (Cilium's bpf.events.default.rateLimit / burstLimit; 0 = no limit).
"""

from __future__ import annotations

import ctypes
from typing import Any

from propolis.errors import ValidationError
from propolis.maps import bpf
from propolis.maps.spec import MapSpec

MONITOR_AGGREGATION = {"none": 0, "low": 1, "medium": 2, "maximum": 3}
EVENTS_DISABLE_DROP = 1 << 0
EVENTS_DISABLE_POLICY_VERDICT = 1 << 1
EVENTS_DISABLE_TRACE = 1 << 2


class RuntimeConfig(ctypes.Structure):
    C_STRUCT = "runtime_config"
    _fields_ = [
        ("monitor_aggregation", ctypes.c_uint32),
        ("events_disabled", ctypes.c_uint32),
        ("events_rate_limit", ctypes.c_uint32),
        ("events_burst_limit", ctypes.c_uint32),
        ("reserved", ctypes.c_uint64 * 2),
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
               events_rate_limit: int = 0, events_burst_limit: int = 0) -> RuntimeConfig:
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
    return value


def decode(value: RuntimeConfig) -> dict[str, Any]:
    names = {v: k for k, v in MONITOR_AGGREGATION.items()}
    return {"monitor_aggregation": names.get(value.monitor_aggregation, str(value.monitor_aggregation)),
            "drop_events": not value.events_disabled & EVENTS_DISABLE_DROP,
            "policy_verdict_events": not value.events_disabled & EVENTS_DISABLE_POLICY_VERDICT,
            "trace_events": not value.events_disabled & EVENTS_DISABLE_TRACE,
            "events_rate_limit": value.events_rate_limit, "events_burst_limit": value.events_burst_limit}
