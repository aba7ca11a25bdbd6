"""The datapath's input types, in the shape the policy compiler and the datapath-writer use.

`PolicyEntry` is exactly what propolis.policy produces (one L3/L4 rule row of one
endpoint); `IPCacheEntry` is re-exported from propolis.maps.ipcache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from propolis.maps.ipcache import IPCacheEntry

Direction = Literal["ingress", "egress"]


@dataclass(frozen=True)
class PolicyEntry:
    """One allow/deny row for an endpoint.

    identity 0 = any peer; protocol 0 = any (6 TCP, 17 UDP, 132 SCTP, 1 ICMP);
    port 0 = any port (ICMP: the ICMP type); end_port 0 = single port, else the last
    port of the range; proxy_port != 0 = allow and redirect to that L7 proxy port (later).
    """

    direction: Direction
    identity: int = 0
    protocol: int = 0
    port: int = 0
    end_port: int = 0
    deny: bool = False
    proxy_port: int = 0


__all__ = ["Direction", "IPCacheEntry", "PolicyEntry"]
