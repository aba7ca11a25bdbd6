"""Reconciler targets over the Datapath facade: ipcache rows and per-endpoint policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from propolis.datapath.datapath import Datapath
from propolis.datapath.entries import IPCacheEntry, PolicyEntry


@dataclass(frozen=True)
class EndpointPolicy:
    """What one endpoint enforces: rows plus default-deny per direction."""

    entries: frozenset[PolicyEntry]
    ingress_enforced: bool
    egress_enforced: bool
    l7_pending: bool = False  # some entry carries L7 rules the (future) L7 proxy would enforce: L4 only now


class IpcacheTarget:
    """Key = CIDR string, value = IPCacheEntry."""

    def __init__(self, dp: Datapath) -> None:
        self.dp = dp

    async def update(self, key: str, desired: IPCacheEntry) -> None:
        self.dp.upsert_ipcache([desired])

    async def delete(self, key: str) -> None:
        self.dp.delete_ipcache([key])

    async def list_actual(self) -> Iterable[str]:
        return [e.cidr for e in self.dp.list_ipcache()]


class EndpointPolicyTarget:
    """Key = endpoint id. Rows first, then enforcement flags, so opening never precedes the rows."""

    def __init__(self, dp: Datapath) -> None:
        self.dp = dp

    async def update(self, key: int, desired: EndpointPolicy) -> None:
        self.dp.set_policy(key, desired.entries)
        self.dp.set_enforcement(key, ingress=desired.ingress_enforced, egress=desired.egress_enforced)

    async def delete(self, key: int) -> None:
        """The endpoint went away (CNI DEL detaches it); nothing to keep."""

    async def list_actual(self) -> Iterable[int]:
        return []  # endpoints are removed by CNI DEL, never pruned from here
