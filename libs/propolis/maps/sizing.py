"""Map sizes from the node's memory, as Cilium's `bpf.mapDynamicSizeRatio`
(`--bpf-map-dynamic-size-ratio`, pkg/option calculateDynamicBPFMapSizes).

Why: the fixed 64k/32k conntrack maps fill under load (a flood evicts established flows);
Cilium sizes CT and NAT from memory instead: a share `ratio` of the node's memory is spread
over the maps in proportion to their default entries (CT TCP 512k, CT any 256k, NAT 2/3 of
both), each kept within [Cilium's minimum, 2^24]. Cilium's examples: 1 GiB with 0.0025 ->
66,280 TCP entries; 16 GiB -> 1,060,485. A ratio of 0 keeps the specs' fixed sizes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os

from propolis.errors import ValidationError
from propolis.maps import conntrack, lb
from propolis.maps.spec import MapSpec

LIMIT_TABLE_MAX = 1 << 24
# pin name -> (Cilium's default entries, Cilium's minimum when sized from memory)
_DEFAULTS = {
    conntrack.TCP_SPEC.pin_name: (524_288, 131_072),    # CTMapEntriesGlobalTCPDefault, LimitTableAutoGlobalTCPMin
    conntrack.ANY_SPEC.pin_name: (262_144, 65_536),     # CTMapEntriesGlobalAnyDefault, LimitTableAutoGlobalAnyMin
    lb.SNAT_SPEC.pin_name: (524_288, 131_072),          # NATMapEntriesGlobalDefault (2/3 of CT), LimitTableAutoNatGlobalMin
}
DYNAMIC_SPECS: tuple[MapSpec, ...] = (conntrack.TCP_SPEC, conntrack.ANY_SPEC, lb.SNAT_SPEC)


def _element_size(spec: MapSpec) -> int:
    return ctypes.sizeof(spec.key_type) + ctypes.sizeof(spec.value_type)


def total_memory() -> int:
    """The node's memory in bytes (Cilium reads the same figure from the system)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def dynamic_sizes(ratio: float, memory: int | None = None) -> dict[str, int]:
    """max_entries per pin name for `ratio` of `memory` (default: this machine's); {} for 0."""
    if not 0.0 <= ratio <= 1.0:
        raise ValidationError("map_dynamic_size_ratio", f"{ratio} is not within 0.0 .. 1.0")
    if ratio == 0.0:
        return {}
    available = int((memory if memory is not None else total_memory()) * ratio)
    default_total = sum(_DEFAULTS[s.pin_name][0] * _element_size(s) for s in DYNAMIC_SPECS)
    sizes = {}
    for spec in DYNAMIC_SPECS:
        default, minimum = _DEFAULTS[spec.pin_name]
        sizes[spec.pin_name] = max(minimum, min(LIMIT_TABLE_MAX, default * available // default_total))
    return sizes


def sized(specs: tuple[MapSpec, ...], sizes: dict[str, int]) -> tuple[MapSpec, ...]:
    """`specs` with the max_entries that `sizes` names replaced."""
    return tuple(dataclasses.replace(s, max_entries=sizes[s.pin_name]) if s.pin_name in sizes else s
                 for s in specs)
