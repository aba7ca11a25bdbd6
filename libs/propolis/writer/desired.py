"""Desired kernel state of one node, computed from the cluster inputs.

* ipcache: every endpoint in the cluster (IP -> identity), every node's InternalIP (this
  node -> host, others -> remote-node, or the node identity a labelled toNodes/fromNodes needs),
  the API server's addresses (the ``default/kubernetes`` Service's EndpointSlices, as Cilium
  reads them) -> kube-apiserver (7) unless it is this node's own address (host), each node's
  health address (annotation ``network.cilium.io/ipv4-health-ip``) -> health (4), and the CIDR
  identities the policies need (CIDRs, CIDR groups, toServices addresses outside the cluster).
* per local endpoint: the compiled policy rows and enforcement per direction.
* services: this node's load-balancing frontends and backends.

The policy part is delegated to `propolis.policy` (selector cache, compiler) and the
service part to `propolis.lb`; this module only gathers inputs into their calling
shapes. CIDR identities stay node-local (allocated from ``1 << 24``, as Cilium does).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from propolis.clustermesh import imported
from propolis.datapath.entries import IPCacheEntry, PolicyEntry
from propolis.encryption.backend import LISTEN_PORT as WIREGUARD_PORT
from propolis.errors import ValidationError
from propolis.lb import hostport
from propolis.lb.desired import SERVICE_NAME_LABEL, LBService, desired_services
from propolis.lb.frontends import HOSTPORTS, FrontendTable, service_owner
from propolis.maps.endpoints import HOST_ENDPOINT_ID
from propolis.model import identity as idmodel
from propolis.model.types import NumericIdentity
from propolis.policy.engine import CompileResult, PeerObject, PeerTables, PolicyEngine
from propolis.policy.entries import PROTO_TCP, PROTO_UDP
from propolis.writer.targets import EndpointPolicy

if TYPE_CHECKING:
    from propolis.bus.messages import K8sObject
    from propolis.reconcile import Reconciler
    from propolis.writer.endpoints import LocalEndpoint
    from propolis.writer.inputs import ClusterInputs

log = logging.getLogger("propolis.writer.desired")


HEALTH_IP_ANNOTATION = "network.cilium.io/ipv4-health-ip"  # Cilium's annotation for a node's health endpoint
KUBE_APISERVER_SERVICE = ("default", "kubernetes")
#: (protocol, port) the host firewall always lets in from the cluster's nodes: NATS clients and routes (the bus
#: every service needs) and WireGuard between nodes (Cilium likewise never cuts its own control traffic);
#: replies to what the node opened itself pass by conntrack
HOST_CONTROL_PORTS = ((PROTO_TCP, 4222), (PROTO_TCP, 6222), (PROTO_UDP, WIREGUARD_PORT))


def node_internal_ip(node_obj: K8sObject) -> str | None:
    for addr in node_obj.status.get("addresses") or []:
        if addr.get("type") == "InternalIP":
            return str(addr.get("address"))
    return None


def peer_tables(inputs: ClusterInputs, node: str,
                services: Mapping[tuple[str, str], PeerObject] | None = None) -> PeerTables:
    """Nodes, Services (their EndpointSlice addresses) and CIDR groups, as `node` resolves policy peers
    (`services`: the Services' part when the caller keeps it up to date itself, see `service_peer`)."""
    if services is None:
        slices: dict[tuple[str, str], list[K8sObject]] = {}
        for s in inputs.endpointslices.values():
            slices.setdefault((s.namespace, s.labels.get(SERVICE_NAME_LABEL, "")), []).append(s)
        services = {key: service_peer(svc, slices.get(key, [])) for key, svc in inputs.services.items()}
    return PeerTables(
        local_node=node,
        nodes={name: PeerObject(dict(obj.labels), tuple(ip for ip in [node_internal_ip(obj)] if ip))
               for name, obj in inputs.nodes.items()},
        services=services,
        cidr_groups={name: PeerObject(dict(obj.labels), tuple(str(c) for c in obj.fields.get("externalCIDRs") or []))
                     for name, obj in inputs.cidr_groups.items()})


def service_peer(svc: K8sObject, slices: Iterable[K8sObject]) -> PeerObject:
    """A Service as a toServices peer: its labels and its EndpointSlices' addresses."""
    addresses = {str(a) for s in slices for ep in s.fields.get("endpoints") or [] for a in ep.get("addresses") or []}
    return PeerObject(dict(svc.labels), tuple(sorted(addresses)))


@dataclass
class DesiredState:
    node: str
    mode: str = "default"
    cluster_name: str | None = None
    allow_localhost: bool = False  # Cilium's allow-localhost=always (the writer's default) vs =policy
    default_local_cluster: bool = False  # Cluster Mesh: policy-default-local-cluster (see PolicyEngine)
    policy_audit_mode: bool = False  # Cilium's policyAuditMode: every endpoint reports would-be drops, drops nothing
    host_firewall: bool = False  # Cilium's hostFirewall.enabled: the node is an endpoint (HOST_ENDPOINT_ID)
    host_audit_mode: bool = False  # the host endpoint's own PolicyAuditMode (`endpoint config node:NAME`)
    ipcache: dict[str, IPCacheEntry] = field(default_factory=dict)
    policies: dict[int, EndpointPolicy] = field(default_factory=dict)
    #: this node's LB frontends per Service (and HostPorts), with the frontends changed since the writer took them
    lb: FrontendTable = field(default_factory=FrontendTable)
    #: "namespace/name" of a Service -> why it could not be programmed (shown in status)
    service_errors: dict[str, str] = field(default_factory=dict)
    #: endpoint id -> why its policy could not be computed (it keeps its previous desired policy)
    policy_errors: dict[int, str] = field(default_factory=dict)
    engine: PolicyEngine = field(init=False)
    _policy_generation: int = -1
    #: inputs.services_generation the `lb` table reflects: a pod or policy change costs no LB work
    services_generation: int = -1
    #: HostPort frontend -> the pod holding it (of two claimants, the later one is reported, not installed)
    _hostport_owners: dict[hostport.Frontend, tuple[str, str]] = field(default_factory=dict)
    _hostport_conflicts: set[str] = field(default_factory=set)  # the "Pod ns/name" keys of `service_errors`
    _node_ips: list[str] | None = None  # this node's addresses the NodePort and HostPort frontends were made for
    _hostports_generation: int = -1
    _endpoint_ips: dict[int, frozenset[str]] = field(default_factory=dict)
    _peer_tables: PeerTables | None = None
    #: the Services as policy peers, redone per changed Service (None: not built yet, the next pass builds all)
    _peer_services: dict[tuple[str, str], PeerObject] | None = None
    #: Services taken from `inputs.services_changed`, still to be redone as LB frontends / as policy peers
    _lb_dirty: set[tuple[str, str]] = field(default_factory=set)
    _peers_dirty: set[tuple[str, str]] = field(default_factory=set)
    #: the ipcache in layers, a row of an earlier one wins: this cluster's endpoints; Cluster Mesh remote pods
    #: (changed row by row, never rebuilt); this cluster's nodes, reserved addresses and CIDR identities;
    #: remote clusters' nodes (rebuilt only when they change). Rebuilt layers are sized by this cluster alone.
    _local_rows: dict[str, IPCacheEntry] = field(default_factory=dict)
    _remote_rows: dict[str, IPCacheEntry] = field(default_factory=dict)
    _infra_rows: dict[str, IPCacheEntry] = field(default_factory=dict)
    _remote_node_rows: dict[str, IPCacheEntry] = field(default_factory=dict)
    _remote_nodes_generation: int = -1
    #: prefixes whose layers changed and whose row is still to be redone
    _dirty_prefixes: set[str] = field(default_factory=set)
    #: prefixes of `ipcache` changed since the writer last took them (`hand_ipcache_changes`)
    _ipcache_changes: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.engine = PolicyEngine(mode=self.mode, cluster_name=self.cluster_name,
                                   allow_localhost=self.allow_localhost, default_local_cluster=self.default_local_cluster)

    def _take_service_changes(self, inputs: ClusterInputs) -> None:
        changed = inputs.take_services_changed()
        self._lb_dirty |= changed
        self._peers_dirty |= changed

    def _current_peer_tables(self, inputs: ClusterInputs) -> PeerTables:
        """`peer_tables`, with the Services' part redone only for the Services that changed; a new mapping when
        any did (the engine compares it with the last one), the same one otherwise."""
        if self._peer_services is None:
            inputs.reindex_slices()  # the first pass: everything from the tables, and the index with them
            self._peer_services = dict(peer_tables(inputs, self.node).services)
            self._peers_dirty.clear()
        elif self._peers_dirty:
            services = dict(self._peer_services)
            for key in self._peers_dirty:
                svc = inputs.services.get(key)
                if svc is None:
                    services.pop(key, None)
                else:
                    services[key] = service_peer(svc, inputs.slices_by_service.get(key, {}).values())
            self._peer_services = services
            self._peers_dirty.clear()
        return peer_tables(inputs, self.node, self._peer_services)

    def _sync_engine(self, inputs: ClusterInputs) -> None:
        endpoint_ips: dict[int, set[str]] = {}
        for rec in inputs.endpoints.values():
            endpoint_ips.setdefault(rec.identity, set()).update(ip for ip in rec.ips if ":" not in ip)
        frozen = {n: frozenset(ips) for n, ips in endpoint_ips.items()}
        self._take_service_changes(inputs)
        tables = self._current_peer_tables(inputs)
        if inputs.policy_generation != self._policy_generation or frozen != self._endpoint_ips or \
                tables != self._peer_tables:
            self.engine.update(policies=list(inputs.policies.values()), identities=inputs.identities,
                               named_ports={e.identity: e.named_ports for e in inputs.endpoints.values()},
                               endpoint_ips=frozen, peer_tables=tables, fqdn_ips=inputs.fqdn_ips)
            self._policy_generation = inputs.policy_generation
            self._endpoint_ips = frozen
            self._peer_tables = tables

    def _reserved_addresses(self, inputs: ClusterInputs) -> dict[str, NumericIdentity]:
        """IPv4 -> reserved identity for the API server (7) and the nodes' health endpoints (4)."""
        out: dict[str, NumericIdentity] = {}
        for s in inputs.slices_by_service.get(KUBE_APISERVER_SERVICE, {}).values():
            for ep in s.fields.get("endpoints") or []:
                out.update((str(a), idmodel.RESERVED_KUBE_APISERVER) for a in ep.get("addresses") or []
                           if ":" not in str(a))
        for obj in inputs.nodes.values():
            health = (obj.fields.get("annotations") or {}).get(HEALTH_IP_ANNOTATION)
            if health and ":" not in str(health):
                out[str(health)] = idmodel.RESERVED_HEALTH
        return out

    def compiled(self, inputs: ClusterInputs, identity: int) -> CompileResult:
        """The compiled policy of an identity, as the writer compiles it (the L7 proxy reads its rules)."""
        self._sync_engine(inputs)
        return self.engine.compile_endpoint(identity)

    def endpoint_policy(self, inputs: ClusterInputs, ep: LocalEndpoint) -> EndpointPolicy:
        self._sync_engine(inputs)
        result = self.engine.compile_endpoint(ep.identity, namespace=ep.namespace)
        return EndpointPolicy(frozenset(result.entries), result.ingress_enforced, result.egress_enforced,
                              l7_pending=not result.l7_enforced,
                              audit=self.policy_audit_mode or ep.policy_audit_mode)

    def host_policy(self, inputs: ClusterInputs) -> EndpointPolicy:
        """The node's own policy (hostFirewall): CCNPs whose nodeSelector selects it, plus the suite's bus
        from the cluster's nodes (`HOST_CONTROL_PORTS`) whenever ingress is enforced."""
        self._sync_engine(inputs)
        result = self.engine.compile_host()
        entries = set(result.entries)
        if result.ingress_enforced:
            nodes = {idmodel.RESERVED_HOST, idmodel.RESERVED_REMOTE_NODE, *self.engine.node_identities().values()}
            entries |= {PolicyEntry("ingress", identity=n, protocol=proto, port=port)
                        for n in nodes for proto, port in HOST_CONTROL_PORTS}
        return EndpointPolicy(frozenset(entries), result.ingress_enforced, result.egress_enforced,
                              audit=self.policy_audit_mode or self.host_audit_mode)

    def update(self, inputs: ClusterInputs, local: list[LocalEndpoint]) -> None:
        self._sync_engine(inputs)
        self._update_ipcache(inputs)
        self.policies, self.policy_errors = self._policies(inputs, local)
        if self.host_firewall:
            self.policies[HOST_ENDPOINT_ID] = self.host_policy(inputs)
        if inputs.services_generation != self.services_generation:
            self._update_services(inputs, full=self.services_generation < 0)
            self.services_generation = inputs.services_generation

    @property
    def services(self) -> list[LBService]:
        """This node's LB frontends, as the maps should hold them."""
        return list(self.lb.frontends.values())

    def recompute_services(self, inputs: ClusterInputs) -> None:
        """Every Service from scratch (the LB reconciler's periodic repair: bookkeeping drift cannot last)."""
        self._take_service_changes(inputs)
        inputs.reindex_slices()
        self._peer_services = None  # the next pass rebuilds the policy peers as well
        self._update_services(inputs, full=True)

    def hand_ipcache_changes(self, reconciler: Reconciler[str, IPCacheEntry]) -> None:
        """The rows changed since the last call into the ipcache reconciler's desired table, and only those:
        a remote pod's churn costs its row, not a diff of the whole table."""
        for prefix in self._ipcache_changes:
            row = self.ipcache.get(prefix)
            if row is None:
                reconciler.remove(prefix)
            else:
                reconciler.upsert(prefix, row)
        self._ipcache_changes.clear()

    def _cluster_rows(self, inputs: ClusterInputs) -> tuple[dict[str, IPCacheEntry], dict[str, IPCacheEntry]]:
        """(this cluster's nodes, reserved addresses, CIDR identities), (this cluster's endpoints): rebuilt every
        pass, their size follows this cluster alone."""
        ipc: dict[str, IPCacheEntry] = {}
        node_ids = self.engine.node_identities()
        for (node_name, obj) in inputs.nodes.items():
            ip = node_internal_ip(obj)
            if ip:
                ident = idmodel.RESERVED_HOST if node_name == self.node else \
                    node_ids.get(ip, idmodel.RESERVED_REMOTE_NODE)
                ipc[f"{ip}/32"] = IPCacheEntry(f"{ip}/32", ident)
        for ip, ident in self._reserved_addresses(inputs).items():
            node_row = ipc.get(f"{ip}/32")
            if node_row is None or node_row.identity != idmodel.RESERVED_HOST:  # this node's own address stays host
                ipc[f"{ip}/32"] = IPCacheEntry(f"{ip}/32", ident)
        for prefix, ident in self.engine.cidr_identities().items():
            if ":" not in prefix and prefix not in self._remote_node_rows:  # a CIDR never matches a node
                ipc.setdefault(prefix, IPCacheEntry(prefix, ident))
        endpoints = {f"{ip}/32": IPCacheEntry(f"{ip}/32", NumericIdentity(rec.identity))
                     for rec in inputs.endpoints.values()
                     for ip in rec.ips if ":" not in ip}  # the datapath is IPv4-only for now
        return ipc, endpoints

    def _remote_node_changes(self, inputs: ClusterInputs) -> None:
        """Cluster Mesh: other clusters' nodes are remote nodes too; redone only when they changed."""
        if inputs.remote_nodes_generation == self._remote_nodes_generation:
            return
        rows = {f"{ip}/32": IPCacheEntry(f"{ip}/32", idmodel.RESERVED_REMOTE_NODE)
                for ips in inputs.remote_nodes.values() for ip in ips}
        self._dirty_prefixes |= {k for k in rows.keys() | self._remote_node_rows.keys()
                                 if rows.get(k) != self._remote_node_rows.get(k)}
        self._remote_node_rows = rows
        self._remote_nodes_generation = inputs.remote_nodes_generation

    def _remote_endpoint_changes(self, inputs: ClusterInputs) -> None:
        """Cluster Mesh: the remote pods changed since the last pass, row by row."""
        for key in inputs.remote_endpoints_changed:
            record = inputs.remote_endpoints.get(key)
            for ip in record.ips if record is not None else [key[1]]:
                if ":" not in ip:
                    prefix = f"{ip}/32"
                    if record is None:
                        self._remote_rows.pop(prefix, None)
                    else:
                        self._remote_rows[prefix] = IPCacheEntry(prefix, NumericIdentity(record.identity))
                    self._dirty_prefixes.add(prefix)
        inputs.remote_endpoints_changed.clear()

    def _update_ipcache(self, inputs: ClusterInputs) -> None:
        """Redo only the rows whose layers changed (see `_infra_rows`). Changes are collected in
        `_dirty_prefixes` first, so a pass that fails midway loses none."""
        self._remote_node_changes(inputs)
        infra, local_rows = self._cluster_rows(inputs)
        self._remote_endpoint_changes(inputs)
        for old, new in ((self._infra_rows, infra), (self._local_rows, local_rows)):
            if old != new:  # the common case (a remote pod's churn) is equal, compared in C
                self._dirty_prefixes |= {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
        self._infra_rows, self._local_rows = infra, local_rows
        for prefix in self._dirty_prefixes:
            row = next((layer[prefix] for layer in (local_rows, self._remote_rows, infra, self._remote_node_rows)
                        if prefix in layer), None)
            if row is None:
                if self.ipcache.pop(prefix, None) is not None:
                    self._ipcache_changes.add(prefix)
            elif self.ipcache.get(prefix) != row:
                self.ipcache[prefix] = row
                self._ipcache_changes.add(prefix)
        self._dirty_prefixes.clear()

    def _policies(self, inputs: ClusterInputs,
                  local: list[LocalEndpoint]) -> tuple[dict[int, EndpointPolicy], dict[int, str]]:
        """Per endpoint, so one that cannot be computed keeps its previous policy (never more open) and is
        reported, while every other endpoint gets its changes."""
        policies: dict[int, EndpointPolicy] = {}
        errors: dict[int, str] = {}
        for ep in local:
            if not ep.identity:
                continue
            try:
                policies[ep.endpoint_id] = self.endpoint_policy(inputs, ep)
            except Exception as exc:  # noqa: BLE001 - this endpoint only
                errors[ep.endpoint_id] = f"{type(exc).__name__}: {exc}"
                if ep.endpoint_id not in self.policy_errors:
                    log.error("policy of endpoint %d (%s/%s) not computed, previous kept: %s",
                              ep.endpoint_id, ep.namespace, ep.pod, errors[ep.endpoint_id])
                if ep.endpoint_id in self.policies:
                    policies[ep.endpoint_id] = self.policies[ep.endpoint_id]
        return policies, errors

    def _update_services(self, inputs: ClusterInputs, *, full: bool) -> None:
        """Recompute the Services that changed (`inputs.services_changed`; every one when `full`), per Service so
        one invalid Service is reported and skipped instead of stopping all. A change of this node's addresses
        redoes the Services with node-address frontends; HostPorts are redone when pods' HostPorts, the node's
        addresses or a Service's non-ClusterIP frontends changed (those may meet a HostPort)."""
        own = inputs.nodes.get(self.node)
        node_ips = [ip for ip in [node_internal_ip(own) if own else None] if ip]
        changed, self._lb_dirty = self._lb_dirty, set()
        if full:
            changed = set(inputs.services) | {(o[1], o[2]) for o in self.lb.owners() if o != HOSTPORTS}
        elif node_ips != self._node_ips:
            changed |= {key for key, svc in inputs.services.items() if _has_node_port(svc)}
        hostports_due = full or node_ips != self._node_ips or inputs.hostports_generation != self._hostports_generation
        for (ns, name) in sorted(changed):
            owner = service_owner(ns, name)
            before = self.lb.owned(owner).values()
            hostports_due = hostports_due or any(s.frontend_type != "ClusterIP" for s in before)
            svc = inputs.services.get((ns, name))
            entries: list[LBService] = []
            reported = self.service_errors.pop(f"{ns}/{name}", None)
            if svc is not None:
                try:
                    entries = desired_services([svc], inputs.slices_by_service.get((ns, name), {}).values(),
                                               node_name=self.node, node_ips=node_ips,
                                               remote_backends=imported.remote_backends(inputs.remote_services,
                                                                                        (ns, name)))
                except ValidationError as exc:
                    if reported is None:
                        log.warning("service %s/%s not programmed: %s", ns, name, exc)
                    self.service_errors[f"{ns}/{name}"] = str(exc)
            hostports_due = hostports_due or any(s.frontend_type != "ClusterIP" for s in entries)
            self.lb.assign(owner, entries)
        if hostports_due:
            self._update_hostports(inputs, node_ips)
        self._node_ips = node_ips

    def _update_hostports(self, inputs: ClusterInputs, node_ips: list[str]) -> None:
        taken = [f for owner in self.lb.owners() if owner != HOSTPORTS for f in self.lb.owned(owner)]
        host = hostport.desired_hostports(inputs.pods.values(), node_name=self.node, node_ips=node_ips,
                                          taken=taken, owners=self._hostport_owners)
        self._hostport_owners = host.owners
        self.lb.assign(HOSTPORTS, host.services)
        for key in self._hostport_conflicts - host.conflicts.keys():
            self.service_errors.pop(key, None)
        for key, why in host.conflicts.items():
            if key not in self.service_errors:
                log.warning("service %s not programmed: %s", key, why)
            self.service_errors[key] = why
        self._hostport_conflicts = set(host.conflicts)
        self._hostports_generation = inputs.hostports_generation


def _has_node_port(svc: K8sObject) -> bool:
    """Whether a Service has frontends on the node's own addresses (NodePort, LoadBalancer's node ports)."""
    return (svc.fields.get("type") or "ClusterIP") in ("NodePort", "LoadBalancer")
