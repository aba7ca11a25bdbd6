"""Everything the datapath-writer reads from the bus, as one in-memory view with change tracking.

Two KV watches (the k8s slice and the identities slice) feed tables of
namespaces, nodes, policies, identities and endpoints. Each bucket goes through a
``WatermarkGate``: a change reaches the tables only once its owner's watermark covers it, and a
bucket that lost its watermark (purged, store lost) freezes the tables until its owner refilled
it under a new epoch. Each released change bumps a generation and sets an event so the writer
recomputes; ``synced`` turns true only when both gates are ready — before that the writer must
not prune kernel state. Watermarks say which Kubernetes resourceVersion the inputs reflect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from propolis.bus import subjects
from propolis.bus.codec import DecodeError
from propolis.bus.kv import UNDECODABLE, EventType, Kv, KvEvent
from propolis.bus.messages import (
    ClusterNode,
    ClusterService,
    EndpointRecord,
    FqdnCacheRecord,
    IdentityRecord,
    K8sObject,
)
from propolis.bus.watermark import WatermarkGate
from propolis.clustermesh import imported
from propolis.k8s.kinds import POLICY_KINDS
from propolis.lb import hostport
from propolis.lb.desired import SERVICE_NAME_LABEL
from propolis.model.types import NumericIdentity

log = logging.getLogger("propolis.writer.inputs")

#: The kinds `ClusterInputs.apply_k8s` reads from every node (Pods: only the node's own, `k8s_filters`).
CLUSTER_KINDS = ("namespaces", "nodes", "services", "endpointslices", *POLICY_KINDS, "ciliumcidrgroups")
#: What it reads of the identities bucket: identities, endpoints (every node's: ipcache rows and policy peers)
#: and the owner's watermark (`WatermarkGate`); not the label index nor the GC lease.
IDENTITIES_FILTERS = (subjects.IDENTITY_KEYS, subjects.ENDPOINT_KEYS, subjects.WATERMARK_KEY)


def k8s_filters(node: str) -> tuple[str, ...]:
    """What a node's `ClusterInputs` watches of the k8s bucket: its own node's Pods (HostPorts, bandwidth), the
    `CLUSTER_KINDS` and the owner's watermark; not other nodes' Pods nor the watcher's lease, so a Pod update
    reaches only its node."""
    return (subjects.node_pods_keys(node), *(subjects.k8s_keys(kind) for kind in CLUSTER_KINDS),
            subjects.WATERMARK_KEY)
_Key = TypeVar("_Key", str, tuple[str, str])


def _replace(table: dict[_Key, K8sObject], key: _Key, obj: K8sObject | None) -> K8sObject | None:
    """`obj` under `key` (None: remove it); the object it replaced."""
    old = table.get(key)
    if obj is None:
        table.pop(key, None)
    else:
        table[key] = obj
    return old


@dataclass
class ClusterInputs:
    namespaces: dict[str, K8sObject] = field(default_factory=dict)
    nodes: dict[str, K8sObject] = field(default_factory=dict)
    pods: dict[tuple[str, str], K8sObject] = field(default_factory=dict)
    services: dict[tuple[str, str], K8sObject] = field(default_factory=dict)
    endpointslices: dict[tuple[str, str], K8sObject] = field(default_factory=dict)
    policies: dict[str, K8sObject] = field(default_factory=dict)  # KV key -> policy object
    cidr_groups: dict[str, K8sObject] = field(default_factory=dict)  # CiliumCIDRGroup name -> object
    identities: dict[NumericIdentity, list[str]] = field(default_factory=dict)
    endpoints: dict[tuple[str, str], EndpointRecord] = field(default_factory=dict)
    #: Cluster Mesh: global Services as remote clusters share them, (namespace, name) -> cluster -> record
    remote_services: dict[tuple[str, str], dict[str, ClusterService]] = field(default_factory=dict)
    #: Cluster Mesh: other clusters' nodes, (cluster, node) -> InternalIPs (ipcache rows as remote-node)
    remote_nodes: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    remote_nodes_generation: int = 0  # bumps when `remote_nodes` changes (their ipcache rows are redone then)
    #: Cluster Mesh: other clusters' pod IPs, `imported.endpoint_key` -> record; ipcache rows only (no policy
    #: input), kept apart from `endpoints` so a remote pod's churn costs its own row, not a pass over all
    remote_endpoints: dict[tuple[str, str], EndpointRecord] = field(default_factory=dict)
    #: keys of `remote_endpoints` changed since `DesiredState.update` last consumed them
    remote_endpoints_changed: set[tuple[str, str]] = field(default_factory=set)
    #: this node's dns-proxy cache (`apply_fqdn`): IP -> names it was learned for, what toFQDNs selects
    fqdn_ips: dict[str, frozenset[str]] = field(default_factory=dict)
    fqdn_generation: int = 0  # the cache's generation these IPs are from
    #: False while a follower of the FQDN cache has not had its initial value: acting before it would
    #: prune every learned IP (connections to them dropped until the cache arrives)
    fqdn_synced: bool = True
    k8s_gate: WatermarkGate = field(default_factory=lambda: WatermarkGate(subjects.K8S_BUCKET))
    identities_gate: WatermarkGate = field(default_factory=lambda: WatermarkGate(subjects.IDENTITIES_BUCKET))
    generation: int = 0
    policy_generation: int = 0  # bumps only when policies, namespaces or identities change
    services_generation: int = 0  # bumps only when Services, EndpointSlices, Nodes or HostPorts change
    #: Services whose LB inputs (the Service, its EndpointSlices, remote clusters' backends) changed since
    #: `DesiredState` last took them (`take_services_changed`): one event costs its Service, not the table
    services_changed: set[tuple[str, str]] = field(default_factory=set)
    #: (namespace, service name) -> EndpointSlice name -> slice, kept with `endpointslices` by the watch
    slices_by_service: dict[tuple[str, str], dict[str, K8sObject]] = field(default_factory=dict)
    nodes_generation: int = 0  # bumps when a Node changes (NodePort frontends follow the node's addresses)
    hostports_generation: int = 0  # bumps when a pod's HostPort signature changes
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def synced(self) -> bool:
        """Both watches delivered their initial values, and both buckets carry their owner's watermark.

        A bucket without its watermark was wiped (purged, NATS lost its storage) or its owner never
        ran: acting on it would prune every policy and open the endpoints until the owners refill it,
        so the kernel keeps its last state instead (fail closed)."""
        return self.k8s_gate.ready and self.identities_gate.ready and self.fqdn_synced

    @property
    def k8s_watermark(self) -> int:
        return self.k8s_gate.resource_version

    @property
    def identities_watermark(self) -> int:
        return self.identities_gate.resource_version

    @property
    def watermark(self) -> int:
        """The Kubernetes resourceVersion both input streams have reached."""
        return min(self.k8s_watermark, self.identities_watermark)

    def _bump(self, policy: bool = False, services: bool = False) -> None:
        self.generation += 1
        if policy:
            self.policy_generation += 1
        if services:
            self.services_generation += 1
        self.changed.set()

    # --- feeding ---------------------------------------------------------------------
    def apply_k8s(self, ev: KvEvent) -> None:
        self._through(self.k8s_gate, ev, self._k8s_change)

    def apply_identities(self, ev: KvEvent) -> None:
        self._through(self.identities_gate, ev, self._identities_change)

    def _through(self, gate: WatermarkGate, ev: KvEvent, apply: Callable[[KvEvent], None]) -> None:
        was_ready = gate.ready
        released = gate.feed(ev)
        for change in released or ():
            try:
                apply(change)
            except Exception as exc:  # noqa: BLE001 - a key or value we cannot use: per key, the rest goes on
                UNDECODABLE.refused(gate.bucket, change.key, change.revision, f"{type(exc).__name__}: {exc}")
        if released is not None or gate.ready != was_ready:
            self._bump(policy=gate.ready != was_ready)

    def _k8s_change(self, ev: KvEvent) -> None:
        parsed = subjects.parse_k8s_key(ev.key)
        if parsed is None:
            return  # the owner's own keys (its lease): not Kubernetes objects
        kind, ns, name = parsed.kind, parsed.namespace or "", parsed.name
        obj = ev.value if ev.type is EventType.PUT else None
        if obj is not None and not isinstance(obj, K8sObject):
            raise DecodeError(f"{ev.key}: expected a k8s-object, got {type(obj).__name__}")
        if kind == "namespaces":
            old, policy = _replace(self.namespaces, name, obj), True
        elif kind == "nodes":
            old, policy = _replace(self.nodes, name, obj), False
        elif kind == "pods":
            old, policy = _replace(self.pods, (ns, name), obj), False
        elif kind == "services":
            old, policy = _replace(self.services, (ns, name), obj), False
        elif kind == "endpointslices":
            old, policy = _replace(self.endpointslices, (ns, name), obj), False
        elif kind in POLICY_KINDS:
            old, policy = _replace(self.policies, ev.key, obj), True
        elif kind == "ciliumcidrgroups":
            old, policy = _replace(self.cidr_groups, name, obj), True
        else:
            return
        hostports_changed = kind == "pods" and hostport.signature(old) != hostport.signature(obj)
        if kind == "endpointslices":
            self._index_slice(old, obj)
        if kind == "services":
            self.services_changed.add((ns, name))
        self.nodes_generation += kind == "nodes"
        self.hostports_generation += hostports_changed
        self._bump(policy, services=kind in ("services", "endpointslices", "nodes") or hostports_changed)

    def _index_slice(self, old: K8sObject | None, new: K8sObject | None) -> None:
        """`slices_by_service` follows one EndpointSlice; the Services it left and joined are changed."""
        for obj, present in ((old, False), (new, True)):
            if obj is None:
                continue
            owner = (obj.namespace, obj.labels.get(SERVICE_NAME_LABEL, ""))
            slices = self.slices_by_service.setdefault(owner, {})
            if present:
                slices[obj.name] = obj
            else:
                slices.pop(obj.name, None)
                if not slices:
                    del self.slices_by_service[owner]
            self.services_changed.add(owner)

    def reindex_slices(self) -> None:
        """`slices_by_service` rebuilt from `endpointslices` (a full recompute; tables filled directly)."""
        self.slices_by_service = {}
        for obj in self.endpointslices.values():
            self.slices_by_service.setdefault((obj.namespace, obj.labels.get(SERVICE_NAME_LABEL, "")),
                                              {})[obj.name] = obj

    def apply_k8s_released(self, ev: KvEvent) -> None:
        """One change of the k8s bucket as if its watermark had released it (tests; `snapshot`)."""
        self._k8s_change(ev)

    def take_services_changed(self) -> set[tuple[str, str]]:
        """The Services changed since the last call (the caller recomputes exactly those)."""
        changed, self.services_changed = self.services_changed, set()
        return changed

    def _identities_change(self, ev: KvEvent) -> None:
        number = subjects.parse_identity_key(ev.key)
        endpoint = subjects.parse_endpoint_key(ev.key)
        expected = IdentityRecord if number is not None else EndpointRecord if endpoint is not None else None
        if expected is not None and ev.type is EventType.PUT and not isinstance(ev.value, expected):
            raise DecodeError(f"{ev.key}: expected {getattr(expected, 'SCHEMA', expected.__name__)}, "
                              f"got {type(ev.value).__name__}")
        if number is not None:
            if ev.type is EventType.PUT and isinstance(ev.value, IdentityRecord):
                self.identities[NumericIdentity(number)] = list(ev.value.labels)
            else:
                self.identities.pop(NumericIdentity(number), None)
            self._bump(policy=True)
        elif endpoint is not None:
            if ev.type is EventType.PUT and isinstance(ev.value, EndpointRecord):
                self.endpoints[endpoint] = ev.value
            else:
                self.endpoints.pop(endpoint, None)
            self._bump()

    def apply_fqdn(self, ev: KvEvent) -> None:
        """The node's FQDN cache record (`FqdnCacheRecord`, one key per node, the dns-proxy's)."""
        if ev.type is EventType.SYNCED:
            self.fqdn_synced = True
            self._bump(policy=True)
            return
        record = ev.value if ev.type is EventType.PUT else None
        if record is not None and not isinstance(record, FqdnCacheRecord):  # poison: the last good value stays
            expected = getattr(FqdnCacheRecord, "SCHEMA", "FqdnCacheRecord")
            UNDECODABLE.refused(subjects.FQDN_BUCKET, ev.key, ev.revision,
                                f"expected {expected}, got {type(record).__name__}")
            return
        names: dict[str, set[str]] = {}
        for row in record.entries if record is not None else ():
            names.setdefault(str(row.get("ip")), set()).add(str(row.get("name")))
        ips = {ip: frozenset(n) for ip, n in names.items()}
        self.fqdn_generation = record.generation if record is not None else 0
        if ips != self.fqdn_ips:
            self.fqdn_ips = ips
            self._bump(policy=True)

    def apply_clustermesh(self, ev: KvEvent) -> None:
        """Cluster Mesh: a remote cluster's identity or endpoint IP from the local KVStoreMesh cache joins
        the tables (`clustermesh/imported.py`); remote rows are ipcache rows and policy peers, never local."""
        if ev.type is EventType.SYNCED:
            return
        cluster, kind, rest = imported.split_cache_key(ev.key)
        value = ev.value if ev.type is EventType.PUT else None
        if kind == "identities" and rest.isdigit():
            if isinstance(value, IdentityRecord):
                self.identities[NumericIdentity(int(rest))] = list(value.labels)
            else:
                self.identities.pop(NumericIdentity(int(rest)), None)
            self._bump(policy=True)
        elif kind == "nodes":
            if isinstance(value, ClusterNode):
                self.remote_nodes[(cluster, rest)] = [ip for ip in value.ips if ":" not in ip]
            else:
                self.remote_nodes.pop((cluster, rest), None)
            self.remote_nodes_generation += 1
            self._bump()
        elif kind == "services":
            ns, name = subjects.parse_namespaced_name(rest)
            shared = self.remote_services.setdefault((ns, name), {})
            if isinstance(value, ClusterService):
                shared[cluster] = value
            else:
                shared.pop(cluster, None)
            if not shared:
                del self.remote_services[(ns, name)]
            self.services_changed.add((ns, name))
            self._bump(services=True)
        elif kind == "ip":
            key = imported.endpoint_key(cluster, rest)
            record = imported.remote_endpoint(cluster, value)
            if record is None:
                self.remote_endpoints.pop(key, None)
            else:
                self.remote_endpoints[key] = record
            self.remote_endpoints_changed.add(key)
            self._bump()

    @classmethod
    async def snapshot(cls, k8s: Kv, identities: Kv) -> ClusterInputs:
        """The buckets as they are now (CLI tools): initial values only, then synced."""
        inputs = cls()
        for kv, gate, apply in ((k8s, inputs.k8s_gate, inputs._k8s_change),
                                (identities, inputs.identities_gate, inputs._identities_change)):
            for key, entry in (await kv.items()).items():
                for change in gate.feed(KvEvent(EventType.PUT, key, entry.value, entry.revision)) or ():
                    apply(change)  # what the watermark released (keys written before it)
            gate.feed(KvEvent(EventType.SYNCED))
            for change in gate.release_unconfirmed():
                apply(change)
        inputs._bump(policy=True)
        return inputs

    async def follow(self, k8s: Kv, identities: Kv, clustermesh: Kv | None = None, *, node: str) -> None:
        """Run the watches until cancelled: of the k8s and identities buckets only what ``node``'s services
        read (`k8s_filters`, `IDENTITIES_FILTERS`); ``clustermesh``: the cache of remote clusters, if any."""
        async def pump(kv: Kv, keys: str | tuple[str, ...], apply: Callable[[KvEvent], None]) -> None:
            async for ev in kv.watch(keys):
                apply(ev)

        await asyncio.gather(pump(k8s, k8s_filters(node), self.apply_k8s),
                             pump(identities, IDENTITIES_FILTERS, self.apply_identities),
                             *([pump(clustermesh, ">", self.apply_clustermesh)] if clustermesh is not None else []))
