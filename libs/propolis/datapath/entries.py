"""The datapath's input types, in the shape the policy compiler and the datapath-writer use.

`PolicyEntry` is the policy compiler's row type (one L3/L4 rule row of one endpoint),
defined once in propolis.policy.entries; `IPCacheEntry` is re-exported from
propolis.maps.ipcache.
"""

from __future__ import annotations

from propolis.maps.ipcache import IPCacheEntry
from propolis.policy.entries import Direction, PolicyEntry

__all__ = ["Direction", "IPCacheEntry", "PolicyEntry"]
