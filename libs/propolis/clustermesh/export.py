"""The export: this cluster's nodes, identities and endpoint IPs as remote clusters read them.

Key layout of ``PROPOLIS_CLUSTERMESH_V1`` (Cilium's kvstore prefixes in brackets):
``cluster-config`` [cilium/cluster-config/<name>], ``nodes.<node>`` [cilium/state/nodes/v1],
``identities.<id>`` [cilium/state/identities/v1], ``ip.<ip>`` [cilium/state/ip/v1], ``services.<ns>.<name>``
(global Services, `lb/global_services.py`) [cilium/state/services/v1]. The desired
export is a pure function of the local buckets (`desired_export`); `ExportComponent` keeps the bucket
equal to it with the project's `Reconciler` (pruning only after every input delivered its initial values).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any, TypeVar

from propolis.bus import subjects
from propolis.bus.kv import EventType
from propolis.bus.kv_target import KvTarget
from propolis.bus.messages import ClusterConfig, ClusterNode, EndpointRecord, IdentityRecord, IpcacheEntry, K8sObject
from propolis.lb import global_services
from propolis.lb.desired import SERVICE_NAME_LABEL
from propolis.model import identity as idm
from propolis.reconcile import Reconciler
from propolis.runtime.component import Component
from propolis.runtime.service import Runtime

log = logging.getLogger("propolis.clustermesh.export")
_Message = TypeVar("_Message")


def _store(table: dict[str, _Message], kind: type[_Message], key: str, value: object) -> None:
    """`value` under `key` if it is a `kind`; anything else (deleted, poison) removes the key."""
    if isinstance(value, kind):
        table[key] = value
    else:
        table.pop(key, None)


def cluster_node(cluster: str, obj: K8sObject, wireguard_keys: dict[str, str]) -> ClusterNode:
    addresses = obj.status.get("addresses") or []
    ips = [a.get("address", "") for a in addresses if a.get("type") == "InternalIP" and a.get("address")]
    cidrs = list(obj.fields.get("podCIDRs") or ([obj.fields["podCIDR"]] if obj.fields.get("podCIDR") else []))
    return ClusterNode(cluster, obj.name, ips, cidrs, wireguard_keys.get(obj.name, ""))


def desired_export(*, cluster_name: str, cluster_id: int, nodes: dict[str, K8sObject],
                   identities: Iterable[IdentityRecord], endpoints: Iterable[EndpointRecord],
                   wireguard_keys: dict[str, str] | None = None, services: Iterable[K8sObject] = (),
                   endpoint_slices: Iterable[K8sObject] = ()) -> dict[str, Any]:
    """Export key -> message. Only this cluster's own identities are exported (reserved ones mean the same
    everywhere); an endpoint's IPs carry its identity and the InternalIP of its node."""
    out: dict[str, Any] = {}
    exported_nodes = {name: cluster_node(cluster_name, obj, wireguard_keys or {}) for name, obj in nodes.items()}
    out[subjects.CLUSTER_CONFIG_KEY] = ClusterConfig(cluster_name, cluster_id,
                                            sorted({c for n in exported_nodes.values() for c in n.pod_cidrs}))
    for name, node in exported_nodes.items():
        out[subjects.export_node_key(name)] = node
    for ident in identities:
        if not ident.reserved and idm.is_cluster_identity(ident.id) and idm.cluster_id_of(ident.id) == cluster_id:
            out[subjects.export_identity_key(ident.id)] = ident
    for ep in endpoints:
        ep_node = exported_nodes.get(ep.node)
        node_ip = ep_node.ips[0] if ep_node and ep_node.ips else ""
        for ip in ep.ips:
            if ":" not in ip:  # IPv4 only, as the datapath
                out[subjects.export_ip_key(ip)] = IpcacheEntry(ip, 32, ep.identity, ep.node, node_ip)
    slices: dict[tuple[str, str], list[K8sObject]] = {}
    for s in endpoint_slices:
        slices.setdefault((s.namespace, s.labels.get(SERVICE_NAME_LABEL, "")), []).append(s)
    for svc in services:
        if global_services.is_global(svc):
            out[subjects.export_service_key(svc.namespace, svc.name)] = global_services.cluster_service(
                cluster_name, cluster_id, svc, slices.get((svc.namespace, svc.name), []))
    return out


class ExportComponent(Component):
    """Keeps ``PROPOLIS_CLUSTERMESH_V1`` equal to `desired_export` of the local buckets."""

    name = "export"
    title = "exports nodes, identities and endpoint IPs to remote clusters"

    def __init__(self, *, cluster_name: str, cluster_id: int, debounce: float = 0.05) -> None:
        super().__init__()
        self.cluster_name = cluster_name
        self.cluster_id = cluster_id
        self.debounce = debounce
        self.nodes: dict[str, K8sObject] = {}
        self.services: dict[str, K8sObject] = {}
        self.endpoint_slices: dict[str, K8sObject] = {}
        self.identities: dict[str, IdentityRecord] = {}
        self.endpoints: dict[str, EndpointRecord] = {}
        self.wireguard_keys: dict[str, str] = {}
        self.synced: set[str] = set()
        self.changed = asyncio.Event()

    async def start(self, rt: Runtime) -> None:
        self.rt = rt
        self.export: Reconciler[str, Any] = Reconciler("clustermesh-export",
                                                       KvTarget(await rt.bus.kv(subjects.CLUSTERMESH_BUCKET)),
                                                       refresh_interval=300.0)
        rt.spawn("export-reconciler", self.export.run(), self)
        rt.spawn("watch-k8s", self._watch(subjects.K8S_BUCKET, ">"), self)
        rt.spawn("watch-identities", self._watch(subjects.IDENTITIES_BUCKET, ">"), self)
        rt.spawn("watch-wireguard", self._watch(subjects.WIREGUARD_BUCKET, ">"), self)
        rt.spawn("compute-export", self._compute_loop(), self)
        self.set_degraded("waiting for the local buckets")

    async def _watch(self, bucket: str, keys: str) -> None:
        kv = await self.rt.bus.kv(bucket)
        async for ev in kv.watch(keys):
            if ev.type is EventType.SYNCED:
                self.synced.add(bucket)
            else:
                self._apply(bucket, ev.key, ev.value if ev.type is EventType.PUT else None)
            self.changed.set()

    def _apply(self, bucket: str, key: str, value: Any) -> None:
        """One input change; a value of the wrong type counts as absent (poison never exported)."""
        if bucket == subjects.WIREGUARD_BUCKET:
            public_key = getattr(value, "public_key", "")
            if public_key:
                self.wireguard_keys[key] = public_key
            else:
                self.wireguard_keys.pop(key, None)
            return
        if bucket == subjects.K8S_BUCKET:
            kinds = {"nodes": self.nodes, "services": self.services, "endpointslices": self.endpoint_slices}
            parsed = subjects.parse_k8s_key(key)
            if parsed is not None and parsed.kind in kinds:
                _store(kinds[parsed.kind], K8sObject, key, value)
        elif subjects.parse_identity_key(key) is not None:
            _store(self.identities, IdentityRecord, key, value)
        elif subjects.parse_endpoint_key(key) is not None:
            _store(self.endpoints, EndpointRecord, key, value)

    async def _compute_loop(self) -> None:
        inputs = {subjects.K8S_BUCKET, subjects.IDENTITIES_BUCKET, subjects.WIREGUARD_BUCKET}
        while True:
            await self.changed.wait()
            await asyncio.sleep(self.debounce)
            self.changed.clear()
            self.export.replace_all(desired_export(
                cluster_name=self.cluster_name, cluster_id=self.cluster_id,
                nodes={o.name: o for o in self.nodes.values()}, identities=self.identities.values(),
                endpoints=self.endpoints.values(), wireguard_keys=self.wireguard_keys,
                services=self.services.values(), endpoint_slices=self.endpoint_slices.values()))
            if self.synced >= inputs:
                self.export.mark_synced()
                errors = self.export.errors()
                if errors:
                    self.set_degraded(f"{len(errors)} export errors")
                else:
                    self.set_ok(f"{len(self.export.desired)} keys exported")
            self.rt.progress["clustermesh_export"] = {"keys": len(self.export.desired),
                                                      "synced": self.synced >= inputs}
