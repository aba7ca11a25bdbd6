"""Reconciler targets over the Datapath facade: ipcache rows and per-endpoint policy."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from propolis.datapath.datapath import Datapath
from propolis.datapath.entries import IPCacheEntry, PolicyEntry
from propolis.datapath.services import ServiceDiff
from propolis.lb.frontends import Frontend, FrontendTable


@dataclass(frozen=True)
class EndpointPolicy:
    """What one endpoint enforces: rows plus default-deny per direction."""

    entries: frozenset[PolicyEntry]
    ingress_enforced: bool
    egress_enforced: bool
    l7_pending: bool = False  # some entry carries L7 rules no proxy enforces (l7proto): L4 only
    audit: bool = False  # policy audit mode (global policyAuditMode or the endpoint's own): report, do not drop


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
        self.dp.set_enforcement(key, ingress=desired.ingress_enforced, egress=desired.egress_enforced,
                                audit=desired.audit)

    async def refresh(self, key: int, desired: EndpointPolicy) -> None:
        """Diff against the map itself: rows deleted or changed by hand are written back."""
        self.dp.set_policy(key, desired.entries, reread=True)
        self.dp.set_enforcement(key, ingress=desired.ingress_enforced, egress=desired.egress_enforced,
                                audit=desired.audit)

    async def delete(self, key: int) -> None:
        """A policy map whose endpoint is gone from cilium_lxc: unhook and unpin it. An attached
        endpoint's map is never removed here (CNI DEL detaches the endpoint and its map together)."""
        if key not in {e.endpoint_id for e in self.dp.list_endpoints()}:
            self.dp.remove_policy_map(key)

    async def list_actual(self) -> Iterable[int]:
        """Policy maps in bpffs whose endpoint is not in cilium_lxc (left by an interrupted detach)."""
        attached = {e.endpoint_id for e in self.dp.list_endpoints()}
        return [i for i in self.dp.policy_map_ids() if i not in attached]


class ServicesTarget:
    """The node's Service LB maps as one object (key = node name, value = the services generation of `table`,
    the DesiredState's frontend table): the maps share backend ids and slots across frontends, so they are
    written as one diff. Only the frontends changed since the last write are written
    (`Datapath.update_services`); the first write in this process, one after a failed write, and the periodic
    refresh are full (`set_services` / `resync_services`: diffed against the maps as read back), so the maps
    converge after a restart, a purge or a write that failed halfway."""

    def __init__(self, dp: Datapath, table: FrontendTable | None = None) -> None:
        self.dp = dp
        self.table = table if table is not None else FrontendTable()
        #: called before a refresh to rebuild `table` from the inputs (the full recompute), if set
        self.recompute: Callable[[], None] | None = None
        self._unwritten: set[Frontend] = set()
        self._full_due = True  # no full write in this process yet, or the last write may have stopped halfway
        self.last: ServiceDiff | None = None  # the last write's figures (bench, status)

    async def update(self, key: str, desired: int) -> None:
        self._unwritten |= self.table.take_changes()
        if self._full_due:
            await self.refresh(key, desired, recompute=False)
            return
        frontends = self.table.frontends
        changed = self._unwritten
        self._full_due = True  # until the write below returns
        self.last = self.dp.update_services([frontends[f] for f in changed if f in frontends],
                                            [f for f in changed if f not in frontends])
        self._unwritten, self._full_due = set(), False

    async def refresh(self, key: str, desired: int, recompute: bool = True) -> None:
        """Everything again, diffed against the maps as read back: an entry deleted by hand comes back."""
        if recompute and self.recompute is not None:
            self.recompute()
        self._unwritten |= self.table.take_changes()
        self.last = self.dp.resync_services(self.table.frontends.values())
        self._unwritten, self._full_due = set(), False

    async def delete(self, key: str) -> None:
        self.dp.set_services(())
        self._full_due = True

    async def list_actual(self) -> Iterable[str]:
        return []  # one object per node, never pruned: its desired value is the empty tuple instead
