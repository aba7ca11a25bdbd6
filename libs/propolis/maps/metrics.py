"""cilium_metrics: packets and bytes per (reason, direction), per CPU.

Mirrors `struct metrics_key` / `struct metrics_value` in bpf/lib/maps.h. Reason 0 is
"forwarded", anything else a drop reason (propolis.maps.drop). Readers sum the CPUs.
Show it: `propolis bpf metrics list`.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from propolis.maps import bpf
from propolis.maps.drop import reason_text
from propolis.maps.spec import MapSpec

METRIC_DIR_UNKNOWN = 0
METRIC_DIR_INGRESS = 1
METRIC_DIR_EGRESS = 2
METRIC_DIR_SERVICE = 3
DIRECTION_NAMES = {0: "UNKNOWN", 1: "INGRESS", 2: "EGRESS", 3: "SERVICE"}
REASON_FORWARDED = 0


class MetricsKey(ctypes.Structure):
    C_STRUCT = "metrics_key"
    _fields_ = [
        ("reason", ctypes.c_uint8),
        ("dir", ctypes.c_uint8),
        ("line", ctypes.c_uint16),
        ("file", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 3),
    ]


class MetricsValue(ctypes.Structure):
    C_STRUCT = "metrics_value"
    _fields_ = [("count", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


SPEC = MapSpec(
    pin_name="cilium_metrics",
    c_name="cilium_metrics",
    map_type=bpf.BPF_MAP_TYPE_PERCPU_HASH,
    key_type=MetricsKey,
    value_type=MetricsValue,
    max_entries=1024,
    why_size="Cilium's size: (reasons x directions) is well under a thousand rows",
    size_define="METRICS_MAP_SIZE",
    c_key_struct="metrics_key",
    c_value_struct="metrics_value",
)


@dataclass(frozen=True)
class MetricsRow:
    reason: int
    direction: int
    packets: int
    bytes: int

    @property
    def reason_name(self) -> str:
        return reason_text(self.reason)

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason_name, "reason_code": self.reason,
                "direction": DIRECTION_NAMES.get(self.direction, str(self.direction)),
                "packets": self.packets, "bytes": self.bytes}


def dump(bpf_map: bpf.BpfMap[Any, Any]) -> list[MetricsRow]:
    totals: dict[tuple[int, int], list[int]] = {}
    for key, per_cpu in bpf_map.items():
        slot = totals.setdefault((key.reason, key.dir), [0, 0])
        for value in per_cpu:
            slot[0] += value.count
            slot[1] += value.bytes
    return [MetricsRow(r, d, c, b) for (r, d), (c, b) in sorted(totals.items())]
