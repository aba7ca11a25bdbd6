"""One Python module per BPF map, mirroring bpf/lib/maps.h with ctypes (cilium pkg/maps style).

Each module owns its map's pin name, size (and why), key/value structs naming their C
struct, the conversion from desired objects, and a dump helper for `propolis bpf …`.
`ALL_SPECS` lists the node-wide maps (per-endpoint policy maps are named by
policy.inner_pin_name). tests/bpf/test_layouts.py checks every layout against bcc.
"""

from __future__ import annotations

from propolis.maps import config, conntrack, endpoints, events, fragments, ipcache, lb, metrics, policy, sock
from propolis.maps.spec import MapSpec, default_pin_dir

ALL_SPECS: tuple[MapSpec, ...] = (
    endpoints.SPEC,
    ipcache.SPEC,
    policy.OUTER_SPEC,
    conntrack.TCP_SPEC,
    conntrack.ANY_SPEC,
    fragments.SPEC,
    metrics.SPEC,
    config.SPEC,
    events.SPEC,
    events.LOST_BY_TYPE_SPEC,
    events.RATELIMIT_SPEC,
    *lb.SPECS,
    *sock.SPECS,
)

__all__ = ["ALL_SPECS", "MapSpec", "default_pin_dir", "config", "conntrack", "endpoints",
           "events", "fragments", "ipcache", "lb", "metrics", "policy", "sock"]
