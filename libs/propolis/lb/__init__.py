"""Service load-balancing, the logic half (kube-proxy replacement): desired LB entries of a
node from Services and EndpointSlices, and Maglev tables. The kernel half is
`propolis.datapath.Datapath.set_services` and bpf/lib/lb.h.
"""

from __future__ import annotations

from propolis.lb.desired import BACKEND_ACTIVE, BACKEND_TERMINATING, Backend, LBService, desired_services
from propolis.lb.maglev import maglev_table

__all__ = ["BACKEND_ACTIVE", "BACKEND_TERMINATING", "Backend", "LBService", "desired_services", "maglev_table"]
