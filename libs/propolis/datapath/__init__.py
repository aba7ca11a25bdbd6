"""The node's eBPF datapath: bcc loader (compile once per node), tc attach in the node's
namespace, and the `Datapath` facade the datapath-writer drives.

Public API: Datapath, DatapathSettings, AttachResult, PolicyEntry, IPCacheEntry,
PolicyDiff. Map layouts and drop reasons (bpf/lib/drop.h): propolis.maps.
"""

from __future__ import annotations

from propolis.datapath.datapath import AttachResult, Datapath, DatapathSettings, remove_pins
from propolis.datapath.entries import IPCacheEntry, PolicyEntry
from propolis.datapath.services import ServiceDiff, ServiceView
from propolis.maps.policy import PolicyDiff

__all__ = ["AttachResult", "Datapath", "DatapathSettings", "IPCacheEntry", "PolicyDiff", "PolicyEntry",
           "ServiceDiff", "ServiceView",
           "remove_pins"]
