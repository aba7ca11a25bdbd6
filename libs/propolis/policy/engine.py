"""The policy compiler: all policies + the identity table -> one endpoint's policy-map entries.

Why: the datapath-writer needs, per local endpoint, the enforcement flag per
direction and the (identity, protocol, port) rows of its BPF policy map. This
is Cilium's ``pkg/policy`` resolution, in the shape ``propolis.maps.policy`` takes.

Semantics (Cilium, policyEnforcementMode):

* ``default``: a direction is default-deny once a rule selecting the endpoint has a
  non-empty section for it (allow or deny), unless that rule says
  ``enableDefaultDeny.<dir>: false``; any selecting rule asking for default deny wins.
  ``always``: both directions default-deny. ``never``: no enforcement, no entries.
* Allow rules add up; deny entries are emitted with ``deny=True`` and the datapath
  makes them win (bpf/lib/policy.h).
* ``fromRequires``/``toRequires`` of every rule selecting the endpoint are ANDed into
  every ``fromEndpoints``/``toEndpoints`` selector of those rules (Cilium's
  requirements), nothing else.
* CIDR rules select node-local CIDR identities (labels ``cidr:<prefix>``,
  ``reserved:world``); every cidr and except prefix gets its own identity, so the
  ipcache's longest match sends an except hole to an identity the rule does not
  allow. Like Cilium, CIDRs never match cluster endpoints (their /32 ipcache entries
  win). NetworkPolicy ipBlock follows Kubernetes instead when the caller passes
  ``endpoint_ips``: pod identities whose every address is in the block (and outside
  its excepts) are selected too, as the upstream e2e tests expect (the
  ``pod-IP/32`` ipBlock cases). ``0.0.0.0/0`` also selects reserved:world.
* Named ports: ingress against the endpoint's own container ports, egress against
  each destination identity's.
* L7 ``rules``: the entry carries an `L7Annotation`; a family the L7 proxy enforces (HTTP) gets
  the proxy port (`propolis.policy.proxy_ports`), so the datapath hands its flows to the proxy; other
  families leave the L4 port allowed and the result says ``l7_enforced=False``. A rule allowing
  the same peer and port without L7 rules allows every request (no redirect), as in Cilium.
* Peers resolved through cluster objects (`PeerTables`): ``toServices`` selects the identities
  of the Service's EndpointSlice addresses (a pod's identity, else a /32 CIDR identity);
  ``cidrGroupRef``/``cidrGroupSelector`` the CIDR identities of the CiliumCIDRGroups'
  ``externalCIDRs``; a labelled ``fromNodes``/``toNodes`` selector the matching nodes: this node
  is ``reserved:host``, another node gets a node-local identity (Cilium's node-selector labels:
  ``reserved:remote-node`` plus its labels with source ``node``, numbered from ``1 << 25``)
  which the writer puts on that node's addresses in the ipcache.
* ``authentication.mode`` required/test-always-fail: mutual auth is not implemented, so such a
  rule allows nothing (fail closed; Cilium drops with AUTH_REQUIRED until authenticated).
  What stays accepted but not enforced is listed in `propolis.policy.unenforced`.

Shown by the CLI verbs ``propolis policy get`` (`CompileResult.to_json`) and
``propolis policy selectors`` (`PolicyEngine.selections`).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from propolis.errors import ValidationError
from propolis.model import identity as idm
from propolis.model.labels import SOURCE_CIDR, SOURCE_FQDN, SOURCE_K8S, SOURCE_RESERVED, Label, LabelSet
from propolis.model.matchpattern import FqdnSelector
from propolis.model.selectors import LabelSelector, Requirement, equals, exists
from propolis.model.types import NumericIdentity
from propolis.policy.entries import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    PROTOCOL_NUMBERS,
    Direction,
    L7Annotation,
    PolicyEntry,
    icmp_type_port,
)
from propolis.policy.parse import policy_from_record
from propolis.policy.proxy_ports import proxy_port_for
from propolis.policy.rules import (
    CIDRRule,
    DNSRule,
    PeerRule,
    Policy,
    PortProtocol,
    Rule,
    ServiceSelector,
    subnet_of,
)
from propolis.policy.selectorcache import SelectorCache

log = logging.getLogger("propolis.policy")

SOURCE_NODE = "node"  # Cilium's labels.LabelSourceNode: node labels on node identities
NODE_IDENTITY_BASE = 1 << 25  # Cilium's remote-node node-local identity range
AUTH_ENFORCING_MODES = ("required", "test-always-fail")


@dataclass(frozen=True)
class PeerObject:
    """A cluster object a peer field resolves through: its labels and its addresses (IPs or CIDRs)."""

    labels: Mapping[str, str]
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class PeerTables:
    """The cluster objects behind toServices, labelled toNodes/fromNodes and CIDR groups.

    ``nodes``: name -> InternalIPs; ``services``: (namespace, name) -> EndpointSlice addresses;
    ``cidr_groups``: name -> externalCIDRs; ``local_node`` is the node compiling (its node is host)."""

    local_node: str = ""
    nodes: Mapping[str, PeerObject] = field(default_factory=dict)
    services: Mapping[tuple[str, str], PeerObject] = field(default_factory=dict)
    cidr_groups: Mapping[str, PeerObject] = field(default_factory=dict)

MODES = ("default", "always", "never")
NAMED_EGRESS = "named-ports:egress"  # row-cache dependency marker: egress rows resolved named ports
DIRECTIONS: tuple[Direction, ...] = ("ingress", "egress")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
NamedPorts = Mapping[str, tuple[str, int]]
Row = tuple[tuple[int, int, int, int], PolicyEntry, "L7Annotation | None"]  # (hash key, entry, L7)


def _reserved(name: str) -> LabelSelector:
    return LabelSelector((equals(SOURCE_RESERVED, name, ""),))


def entity_selectors(entity: str, cluster_name: str | None = None) -> tuple[LabelSelector, ...]:
    """Cilium's ``EntitySelectorMapping`` (``all`` is handled as identity 0, ``none`` selects nothing)."""
    if entity == "world":
        return (_reserved("world"), _reserved("world-ipv4"), _reserved("world-ipv6"))
    if entity == "cluster":
        local = (LabelSelector((equals(SOURCE_K8S, idm.CLUSTER_LABEL, cluster_name),)) if cluster_name else
                 LabelSelector((exists(SOURCE_K8S, idm.POD_NAMESPACE_LABEL),)))
        return tuple(_reserved(n) for n in ("host", "remote-node", "init", "ingress", "health", "unmanaged",
                                            "kube-apiserver")) + (local,)
    if entity in ("all", "none"):
        return ()
    return (_reserved(entity),)


def cidr_labels(prefix: str) -> LabelSet:
    return LabelSet([Label(SOURCE_CIDR, prefix), Label(SOURCE_RESERVED, "world")])


def fqdn_selector(rule: DNSRule) -> FqdnSelector:
    return FqdnSelector(rule.match_name, rule.match_pattern)


class LocalIdentityAllocator:
    """Default CIDR-prefix -> node-local identity allocator (from ``1 << 24``, reused after release)."""

    def __init__(self) -> None:
        self.by_prefix: dict[str, NumericIdentity] = {}
        self._free: list[NumericIdentity] = []
        self._next = idm.MIN_LOCAL_IDENTITY

    def allocate(self, prefix: str) -> NumericIdentity:
        if prefix not in self.by_prefix:
            if self._free:
                number = self._free.pop()
            else:
                number, self._next = NumericIdentity(self._next), self._next + 1
                if number > idm.MAX_LOCAL_IDENTITY:
                    raise ValidationError("cidr", "node-local identity space exhausted")
            self.by_prefix[prefix] = number
        return self.by_prefix[prefix]

    def release(self, prefix: str) -> None:
        number = self.by_prefix.pop(prefix, None)
        if number is not None:
            self._free.append(number)

    def adopt(self, prefix: str, number: NumericIdentity) -> bool:
        """Keep the number a previous process gave `prefix` (read back from the pinned ipcache).

        Why: numbers depend on allocation history, so a restarted writer allocating afresh could
        swap two prefixes' numbers; the ipcache and the policy maps are reconciled separately, and
        in between a denied prefix would be classified as an allowed one. False if not adoptable.
        """
        if not idm.MIN_LOCAL_IDENTITY <= number <= idm.MAX_LOCAL_IDENTITY or prefix in self.by_prefix \
                or number in self.by_prefix.values():
            return False
        self.by_prefix[prefix] = number
        self._next = max(self._next, number + 1)
        self._free = [n for n in self._free if n != number]
        return True


@dataclass(frozen=True)
class CompileResult:
    """One endpoint's compiled policy."""

    identity: int
    ingress_enforced: bool
    egress_enforced: bool
    entries: tuple[PolicyEntry, ...]
    l7: Mapping[PolicyEntry, tuple[L7Annotation, ...]] = field(default_factory=dict)
    l7_enforced: bool = True  # False while some entry carries L7 rules the proxy does not enforce yet
    origins: tuple[str, ...] = ()  # policies with a rule selecting the endpoint
    notes: tuple[str, ...] = ()

    def enforced(self, direction: str) -> bool:
        return self.ingress_enforced if direction == "ingress" else self.egress_enforced

    def allows(self, direction: str, peer: int, protocol: int, port: int) -> bool:
        """The verdict the datapath gives a new connection: a matching deny wins, then default deny
        (when enforced) unless an allow matches. ``port`` is `icmp_type_port(type)` for ICMP."""
        allowed = False
        for e in self.entries:
            if (e.direction != direction or e.identity not in (0, peer) or e.protocol not in (0, protocol)
                    or not (e.port == 0 or e.port <= port <= (e.end_port or e.port))):
                continue
            if e.deny:
                return False
            allowed = True
        return allowed or not self.enforced(direction)

    def to_json(self) -> dict[str, Any]:
        return {"identity": self.identity, "ingressEnforced": self.ingress_enforced,
                "egressEnforced": self.egress_enforced, "l7Enforced": self.l7_enforced,
                "policies": list(self.origins), "notes": list(self.notes),
                "entries": [{"direction": e.direction, "identity": e.identity, "protocol": e.protocol,
                             "port": e.port, "endPort": e.end_port, "deny": e.deny, "proxyPort": e.proxy_port,
                             "l7": sorted({a.kind for a in self.l7.get(e, ())})} for e in self.entries]}


class PolicyEngine:
    """Holds parsed policies, the identity table (SelectorCache) and CIDR identities; compiles endpoints.

    Feed it with `update` (whole tables; only differences are applied) or the
    fine-grained `upsert_policy` / `remove_policy` / `upsert_identity` / `remove_identity`.
    Results are cached per identity and dropped when anything they could depend on changes.
    """

    def __init__(self, *, mode: str = "default", cluster_name: str | None = None,
                 cidr_allocator: Callable[[str], NumericIdentity] | None = None,
                 cidr_release: Callable[[str], None] | None = None, allow_localhost: bool = False,
                 default_local_cluster: bool = False) -> None:
        if mode not in MODES:
            raise ValidationError("mode", f"must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        #: Cilium's allow-localhost=always (and Kubernetes' "traffic from the node a pod runs on is always
        #: allowed"): an ingress-enforcing endpoint also allows its own node (reserved:host), so kubelet
        #: probes keep working under a default deny. A deny rule naming the host still wins.
        self.allow_localhost = allow_localhost
        self.cluster_name = cluster_name
        #: Cilium's policy-default-local-cluster (Cluster Mesh): a peer selector naming no cluster selects
        #: only endpoints of this cluster (`_cluster_scoped`).
        self.default_local_cluster = default_local_cluster and bool(cluster_name)
        self._local_alloc = LocalIdentityAllocator()
        self._alloc = cidr_allocator or self._local_alloc.allocate
        self._release = cidr_release or (self._local_alloc.release if cidr_allocator is None else None)
        self.cache = SelectorCache()
        self.policies: dict[str, Policy] = {}
        self.errors: dict[str, ValidationError] = {}  # policy key -> why it was refused
        self._raw_policies: dict[str, Any] = {}
        self._raw_identities: dict[int, Any] = {}
        self.named_ports: dict[int, dict[str, tuple[str, int]]] = {}
        self._cidr_ids: dict[str, NumericIdentity] = {}
        self._cidr_nets: dict[str, Network] = {}
        self._results: dict[int, CompileResult] = {}
        self._subject_index: dict[int, list[Rule]] | None = None
        self._row_deps: dict[Any, set[tuple[Any, ...]]] = {}  # selector / marker -> row keys using it
        self._row_users: dict[tuple[Any, ...], set[int]] = {}  # row key -> identities whose result used it
        self._row_cache: dict[tuple[Any, ...], tuple[list[Row],
                                                      frozenset[str]]] = {}
        self._cidr_selection: dict[CIDRRule, frozenset[int]] = {}
        self.endpoint_ips: dict[int, frozenset[str]] = {}
        self.fqdn_ips: dict[str, frozenset[str]] = {}
        self._ipblock_selection: dict[CIDRRule, frozenset[int]] = {}
        self.peer_tables = PeerTables()
        self._peer_fingerprint: Any = None
        self._node_ids: dict[str, NumericIdentity] = {}  # remote node name -> node-local identity
        self.revision = 0
        self._batch = False
        for number in idm.RESERVED_NAMES:
            self.cache.upsert_identity(number, idm.reserved_labels(number))

    # --- inputs ---------------------------------------------------------------------------
    def _changed(self) -> None:
        """Something every result may depend on changed (identities, named ports, CIDR prefixes)."""
        self.revision += 1
        self._results.clear()
        self._subject_index = None
        self._row_cache.clear()
        self._row_deps.clear()
        self._row_users.clear()

    def _policy_changed(self, old: Policy | None, new: Policy | None) -> None:
        """Only endpoints selected by the old or new rules can change (unless CIDR identities moved)."""
        self.revision += 1
        if not self._batch and self._sync_peer_objects():
            self._changed()
            return
        for policy in (old, new):
            for rule in policy.rules if policy is not None else ():
                if rule.subject is None:
                    continue
                selected = self.cache.select(rule.subject)
                for number in selected:
                    self._results.pop(number, None)
                if self._subject_index is not None:
                    for number in selected:
                        rules = self._subject_index.setdefault(number, [])
                        if policy is old:
                            rules[:] = [r for r in rules if r is not rule]
                        else:
                            rules.append(rule)
        if old is not None:
            gone = {id(peer) for rule in old.rules
                    for section in (rule.ingress, rule.ingress_deny, rule.egress, rule.egress_deny)
                    for peer in section}
            for key in [k for k in self._row_cache if k[0] in gone]:
                del self._row_cache[key]

    def upsert_policy(self, key: str, policy: Policy | Any) -> Policy | None:
        """Add or replace one policy (a Policy, a K8sObject record or a raw dict). Invalid -> kept out, error noted."""
        if not isinstance(policy, Policy):
            try:
                policy = policy_from_record(policy)
            except ValidationError as exc:
                log.warning("policy %s refused: %s", key, exc)
                self.errors[key] = exc
                self.remove_policy(key)
                return None
        self.errors.pop(key, None)
        old = self.policies.get(key)
        self.policies[key] = policy
        self._policy_changed(old, policy)
        return policy

    def remove_policy(self, key: str) -> None:
        self._raw_policies.pop(key, None)
        old = self.policies.pop(key, None)
        if old is not None:
            self._policy_changed(old, None)

    def upsert_identity(self, number: int, labels: Iterable[str] | LabelSet) -> None:
        """Only the identity's own result and results built from selectors whose selection moved change."""
        changed = self.cache.upsert_identity(number, idm.identity_labels(number, labels))
        self._identity_moved(number, changed)

    def _identity_moved(self, number: int, changed: set[LabelSelector]) -> None:
        self.revision += 1
        self._results.pop(number, None)
        self._subject_index = None  # rebuilt from cached selections: cheap
        self._drop_rows(changed)

    def remove_identity(self, number: int) -> None:
        if number in idm.RESERVED_NAMES:
            return
        changed: set[Any] = set(self.cache.remove_identity(number))
        if self.named_ports.pop(number, None) is not None:
            changed |= {("named-ports", number), NAMED_EGRESS}
        self._identity_moved(number, changed)

    def update(self, *, policies: Iterable[Any] | Mapping[str, Any] | None = None,
               identities: Mapping[NumericIdentity, Iterable[str] | LabelSet] | None = None,
               namespaces: Mapping[str, Mapping[str, str]] | None = None,
               named_ports: Mapping[int, Mapping[str, Any]] | None = None,
               endpoint_ips: Mapping[int, Iterable[str]] | None = None,
               peer_tables: PeerTables | None = None,
               fqdn_ips: Mapping[str, frozenset[str]] | None = None) -> None:
        """Bring the engine to these whole tables; unchanged entries cost a comparison only.

        ``policies``: K8sObject records, raw k8s dicts or Policy objects (a list, or key -> object);
        ``identities``: number -> label strings; ``named_ports``: identity -> {name: (protocol, port)}.
        ``namespaces`` is accepted for symmetry (namespace labels already live in identities).
        ``endpoint_ips``: identity -> IPs of all its endpoints; turns on Kubernetes ipBlock semantics for
        pods (see `_select_ipblock_pods`).
        ``peer_tables``: what toServices, labelled nodes and CIDR groups resolve through.
        ``fqdn_ips``: IP -> names the node's dns-proxy learned it for (what toFQDNs selects).
        """
        peers_moved = False
        if fqdn_ips is not None and fqdn_ips != self.fqdn_ips:
            self.fqdn_ips = dict(fqdn_ips)
            peers_moved = True
        if peer_tables is not None:
            self.peer_tables = peer_tables
        if endpoint_ips is not None:
            ips = {n: frozenset(v) for n, v in endpoint_ips.items()}
            if ips != self.endpoint_ips:
                self.endpoint_ips = ips
                self._ipblock_selection.clear()
                self._changed()
                peers_moved = True
        if identities is not None:
            wanted = {n: labels for n, labels in identities.items()}
            for number in [n for n in self._raw_identities if n not in wanted]:
                del self._raw_identities[number]
                self.remove_identity(number)
            for number, labels in wanted.items():
                frozen = labels if isinstance(labels, LabelSet) else tuple(labels)
                if self._raw_identities.get(number) != frozen:
                    self._raw_identities[number] = frozen
                    self.upsert_identity(number, frozen)
        if named_ports is not None:
            table = {n: {name: (str(v[0]), int(v[1])) for name, v in ports.items()}
                     for n, ports in named_ports.items()}
            if table != self.named_ports:
                moved = {n for n in set(table) | set(self.named_ports) if table.get(n) != self.named_ports.get(n)}
                self.named_ports = table
                self.revision += 1
                self._drop_rows([NAMED_EGRESS, *(("named-ports", n) for n in moved)])
        if policies is not None:
            self._batch = True
            try:
                self._update_policies(policies)
            finally:
                self._batch = False
        if (policies is not None or peers_moved or peer_tables is not None) and self._sync_peer_objects():
            self._changed()

    def _update_policies(self, policies: Iterable[Any] | Mapping[str, Any]) -> None:
        items = policies.items() if isinstance(policies, Mapping) else ((self._key_of(p), p) for p in policies)
        seen = set()
        for key, obj in items:
            seen.add(key)
            if key in self._raw_policies and self._raw_policies[key] == obj:
                continue
            self._raw_policies[key] = obj
            self.upsert_policy(key, obj)
        for key in [k for k in set(self.policies) | set(self.errors) if k not in seen]:
            self.errors.pop(key, None)
            self.remove_policy(key)

    @staticmethod
    def _key_of(obj: Any) -> str:
        if isinstance(obj, Policy):
            return obj.origin
        if isinstance(obj, dict):
            meta = obj.get("metadata") or {}
            return f"{obj.get('kind')}/{meta.get('namespace', '')}/{meta.get('name', '')}"
        return f"{obj.kind}/{obj.namespace}/{obj.name}"

    # --- peers resolved through cluster objects -----------------------------------------------
    def _all_peers(self) -> Iterable[PeerRule]:
        for policy in self.policies.values():
            for rule in policy.rules:
                for section in (rule.ingress, rule.ingress_deny, rule.egress, rule.egress_deny):
                    yield from section

    def _group_cidrs(self, rule: CIDRRule) -> list[str]:
        """The externalCIDRs of the CiliumCIDRGroups a cidrGroupRef / cidrGroupSelector names."""
        groups = self.peer_tables.cidr_groups
        if rule.cidr_group_ref:
            found = groups.get(rule.cidr_group_ref)
            return list(found.addresses) if found else []
        if rule.cidr_group_selector is not None:
            sel = rule.cidr_group_selector
            return [c for _, g in sorted(groups.items()) if sel.matches(LabelSet.from_map(g.labels))
                    for c in g.addresses]
        return []

    def _service_addresses(self, svc: ServiceSelector) -> list[str]:
        out: list[str] = []
        for (ns, name), obj in sorted(self.peer_tables.services.items()):
            if svc.namespace and ns != svc.namespace:
                continue
            if (svc.name and name == svc.name) or (svc.selector is not None and
                                                     svc.selector.matches(LabelSet.from_map(obj.labels))):
                out.extend(a for a in obj.addresses if ":" not in a)
        return out

    def _pod_identity_by_ip(self) -> dict[str, int]:
        return {ip.split("/")[0]: n for n, ips in self.endpoint_ips.items() for ip in ips}

    def _nodes_matching(self, sel: LabelSelector) -> list[str]:
        return [name for name, obj in sorted(self.peer_tables.nodes.items())
                if sel.matches(LabelSet.from_map(obj.labels, SOURCE_NODE))]

    def _sync_peer_objects(self) -> bool:
        """Node identities and CIDR identities for what the policies name; True if anything moved."""
        uses_services = uses_nodes = uses_groups = False
        for peer in self._all_peers():
            uses_services |= bool(peer.services)
            uses_nodes |= any(not sel.is_wildcard for sel in peer.nodes or ())
            uses_groups |= any(c.cidr_group_ref or c.cidr_group_selector for c in peer.cidrs or ())
        t = self.peer_tables
        fingerprint = (t.local_node, dict(t.services) if uses_services else None,
                       dict(t.nodes) if uses_nodes else None, dict(t.cidr_groups) if uses_groups else None,
                       self.endpoint_ips if uses_services else None)
        moved = bool(fingerprint != self._peer_fingerprint)
        self._peer_fingerprint = fingerprint
        if moved:
            self._cidr_selection.clear()
        return self._sync_nodes() | self._sync_cidrs() | moved

    def _sync_nodes(self) -> bool:
        """Give every other node a labelled node selector matches its node-local identity."""
        wanted: dict[str, NumericIdentity] = {}
        taken: set[int] = set()
        for peer in self._all_peers():
            for sel in peer.nodes or ():
                if sel.is_wildcard:
                    continue
                for name in self._nodes_matching(sel):
                    if name == self.peer_tables.local_node or name in wanted:
                        continue
                    ips = [a for a in self.peer_tables.nodes[name].addresses if ":" not in a]
                    if not ips:
                        continue
                    number = NumericIdentity(NODE_IDENTITY_BASE | (int(ipaddress.ip_address(ips[0])) & 0xFFFFFF))
                    if number in taken:  # two nodes alike in their address's low 24 bits: the later stays out
                        log.warning("node %s: node identity %d already taken; labelled node selectors skip it",
                                    name, number)
                        continue
                    taken.add(number)
                    wanted[name] = number
        moved = wanted != self._node_ids
        for name, number in self._node_ids.items():
            if wanted.get(name) != number:
                self.cache.remove_identity(number)
        for name, number in wanted.items():
            labels = LabelSet([Label(SOURCE_RESERVED, "remote-node")]).union(
                LabelSet.from_map(self.peer_tables.nodes[name].labels, SOURCE_NODE))
            moved |= self.cache.identities.get(number) != labels
            self.cache.upsert_identity(number, labels)
        self._node_ids = wanted
        return moved

    def node_identities(self) -> dict[str, NumericIdentity]:
        """IPv4 address of another node -> its node-local identity (for the ipcache), when a policy needs it."""
        return {a: number for name, number in self._node_ids.items()
                for a in self.peer_tables.nodes[name].addresses if ":" not in a}

    # --- CIDR identities ----------------------------------------------------------------
    def fqdn_selectors(self) -> set[FqdnSelector]:
        """Every toFQDNs selector the policies name (what the dns-proxy learns answers for)."""
        return {fqdn_selector(fq) for peer in self._all_peers() for fq in peer.fqdns or ()}

    def _fqdn_prefixes(self) -> dict[str, LabelSet]:
        """/32 of each learned IP (the dns-proxy's cache, `fqdn_ips`) a toFQDNs selector matches -> its
        `fqdn:<selector>` labels. In-cluster addresses (endpoints, nodes, Service backends) are never
        selected by toFQDNs, whatever a DNS answer says."""
        selectors = self.fqdn_selectors()
        if not selectors or not self.fqdn_ips:
            return {}
        in_cluster = set(self._pod_identity_by_ip())
        for table in (self.peer_tables.nodes, self.peer_tables.services):
            for obj in table.values():
                in_cluster.update(obj.addresses)
        out: dict[str, LabelSet] = {}
        for ip, names in self.fqdn_ips.items():
            if ":" in ip or ip in in_cluster:
                continue
            labels = [Label(SOURCE_FQDN, s.key) for s in selectors if any(s.matches(n) for n in names)]
            if labels:
                out[f"{ip}/32"] = LabelSet(labels)
        return out

    def _sync_cidrs(self) -> bool:
        """Allocate/release CIDR identities for the prefixes the policies name and the IPs toFQDNs
        selectors learned (their identities carry `fqdn:` labels too); True if they changed."""
        wanted: set[str] = set()
        pod_ips = None
        for peer in self._all_peers():
            for c in peer.cidrs or ():
                if c.cidr:
                    wanted.add(c.cidr)
                    wanted.update(c.except_)
                wanted.update(str(ipaddress.ip_network(g, strict=False)) for g in self._group_cidrs(c))
            for svc in peer.services or ():
                pod_ips = self._pod_identity_by_ip() if pod_ips is None else pod_ips
                wanted.update(f"{a}/32" for a in self._service_addresses(svc) if a not in pod_ips)
        fqdn_labels = self._fqdn_prefixes()
        wanted.update(fqdn_labels)
        relabelled = False
        for prefix in wanted & set(self._cidr_ids):
            labels = cidr_labels(prefix).union(fqdn_labels.get(prefix, ()))
            if self.cache.identities.get(self._cidr_ids[prefix]) != labels:
                self.cache.upsert_identity(self._cidr_ids[prefix], labels)
                relabelled = True
        if wanted == set(self._cidr_ids):
            if relabelled:
                self._cidr_selection.clear()
            return relabelled
        for prefix in [p for p in self._cidr_ids if p not in wanted]:
            number = self._cidr_ids.pop(prefix)
            del self._cidr_nets[prefix]
            self.cache.remove_identity(number)
            if self._release is not None:
                self._release(prefix)
        for prefix in sorted(wanted - set(self._cidr_ids)):
            number = self._alloc(prefix)
            self._cidr_ids[prefix] = number
            self._cidr_nets[prefix] = ipaddress.ip_network(prefix)
            self.cache.upsert_identity(number, cidr_labels(prefix).union(fqdn_labels.get(prefix, ())))
        self._cidr_selection.clear()
        return True

    def adopt_cidr_identities(self, numbers: dict[str, NumericIdentity]) -> int:
        """Prefix -> node-local identity a previous instance used (its pinned ipcache): allocate those
        prefixes the same numbers again (default allocator only). Call before the first `update`."""
        if self._alloc != self._local_alloc.allocate:
            return 0
        return sum(self._local_alloc.adopt(prefix, number) for prefix, number in sorted(numbers.items()))

    def cidr_identities(self) -> dict[str, NumericIdentity]:
        """Every CIDR prefix the policies need -> its node-local identity (for the ipcache)."""
        return dict(self._cidr_ids)

    def _select_cidr(self, rule: CIDRRule) -> frozenset[int]:
        cached = self._cidr_selection.get(rule)
        if cached is not None:
            return cached
        ids: set[int] = set()
        for group_cidr in self._group_cidrs(rule):
            ids |= self._select_cidr(CIDRRule(str(ipaddress.ip_network(group_cidr, strict=False))))
        if rule.cidr:
            net = ipaddress.ip_network(rule.cidr)
            holes = [ipaddress.ip_network(e) for e in rule.except_]
            for prefix, pnet in self._cidr_nets.items():
                if subnet_of(pnet, net) and not any(subnet_of(pnet, h) for h in holes):
                    ids.add(self._cidr_ids[prefix])
            if net.prefixlen == 0:  # addresses matching no prefix resolve to world; holes have their own prefixes
                ids |= {idm.RESERVED_WORLD, idm.RESERVED_WORLD_IPV4 if net.version == 4 else idm.RESERVED_WORLD_IPV6}
        result = frozenset(ids)
        self._cidr_selection[rule] = result
        return result

    def _select_ipblock_pods(self, rule: CIDRRule) -> frozenset[int]:
        """Kubernetes ipBlock semantics for pods: an endpoint identity is selected when *every* IP of
        every endpoint carrying it lies in the block and outside its excepts. Identity-based maps cannot
        split an identity by address, so a partly-covered identity is left out (fail closed)."""
        cached = self._ipblock_selection.get(rule)
        if cached is not None:
            return cached
        ids: set[int] = set()
        if rule.cidr:
            net = ipaddress.ip_network(rule.cidr)
            holes = [ipaddress.ip_network(e) for e in rule.except_]
            for number, ips in self.endpoint_ips.items():
                addrs = [ipaddress.ip_address(ip.split("/")[0]) for ip in ips]
                if addrs and all(a in net and not any(a in h for h in holes) for a in addrs):
                    ids.add(number)
        result = frozenset(ids)
        self._ipblock_selection[rule] = result
        return result

    # --- selection --------------------------------------------------------------------------
    def rules_selecting(self, identity: int) -> list[Rule]:
        if self._subject_index is None:
            index: dict[int, list[Rule]] = {}
            for policy in self.policies.values():
                for rule in policy.rules:
                    if rule.subject is None:
                        continue
                    for number in self.cache.select(rule.subject):
                        index.setdefault(number, []).append(rule)
            self._subject_index = index
        return self._subject_index.get(identity, [])

    def all_selectors(self) -> set[LabelSelector]:
        out: set[LabelSelector] = set()
        for policy in self.policies.values():
            for rule in policy.rules:
                if rule.subject is not None:
                    out.add(rule.subject)
                for section in (rule.ingress, rule.ingress_deny, rule.egress, rule.egress_deny):
                    for peer in section:
                        out.update(peer.endpoints or ())
        return out

    def selections(self) -> dict[str, list[int]]:
        """Selector (canonical string) -> identities: the data of `propolis policy selectors`."""
        for sel in self.all_selectors():
            self.cache.select(sel)
        self.cache.retain(self.all_selectors() | {s for e in ("world", "cluster", "host", "remote-node")
                                                  for s in entity_selectors(e, self.cluster_name)})
        return self.cache.selections()

    def _peers(self, peer: PeerRule, requires: tuple[Requirement, ...], notes: set[str],
               deps: set[Any]) -> set[int]:
        """Identities a peer rule names; {0} = every peer. ``deps`` collects the selectors used."""
        if peer.authentication in AUTH_ENFORCING_MODES:
            notes.add(f"authentication mode {peer.authentication} is not implemented: the rule allows nothing")
            return set()
        if not peer.has_l3:
            return {0} if (peer.to_ports or peer.icmps) else set()
        ids: set[int] = set()

        def select(sel: LabelSelector) -> frozenset[int]:
            deps.add(sel)
            return self.cache.select(sel)

        for sel in peer.endpoints or ():
            ids |= select(self._cluster_scoped(sel.with_requirements(requires) if requires else sel))
        for entity in peer.entities or ():
            if entity == "all":
                return {0}
            for sel in entity_selectors(entity, self.cluster_name):
                ids |= select(sel)
        for c in peer.cidrs or ():
            ids |= self._select_cidr(c)
            if peer.k8s_ipblock and self.endpoint_ips:
                ids |= self._select_ipblock_pods(c)
        for sel in peer.nodes or ():
            if sel.is_wildcard:
                ids |= {idm.RESERVED_HOST, idm.RESERVED_REMOTE_NODE, idm.RESERVED_KUBE_APISERVER}
                ids |= set(self._node_ids.values())
                continue
            for name in self._nodes_matching(sel):
                if name == self.peer_tables.local_node:
                    ids.add(idm.RESERVED_HOST)
                elif name in self._node_ids:
                    ids.add(self._node_ids[name])
        if peer.services:
            pod_ips = self._pod_identity_by_ip()
            for svc in peer.services:
                for addr in self._service_addresses(svc):
                    number = pod_ips.get(addr, self._cidr_ids.get(f"{addr}/32"))
                    if number is not None:
                        ids.add(number)
        for fq in peer.fqdns or ():
            ids |= select(LabelSelector((exists(SOURCE_FQDN, fqdn_selector(fq).key),)))
        if peer.groups:
            notes.add("toGroups (cloud groups) is not supported: it selects nothing")
        return ids

    def _cluster_scoped(self, sel: LabelSelector) -> LabelSelector:
        """policy-default-local-cluster: add `io.cilium.k8s.policy.cluster=<local>` to a peer selector that
        names no cluster. The wildcard `{}` (every peer, reserved identities included) is left as it is."""
        if not self.default_local_cluster or sel.is_wildcard or \
                any(r.key == idm.CLUSTER_LABEL for r in sel.requirements):
            return sel
        return sel.with_requirements((equals(SOURCE_K8S, idm.CLUSTER_LABEL, self.cluster_name or ""),))

    # --- ports --------------------------------------------------------------------------------
    @staticmethod
    def _protocols(name: str, port: int) -> tuple[int, ...]:
        if name == "ANY":
            return (PROTO_TCP, PROTO_UDP, PROTO_SCTP) if port else (0,)
        return (PROTOCOL_NUMBERS[name],)

    def _named(self, identity: int, pp: PortProtocol) -> list[tuple[int, int]]:
        found = self.named_ports.get(identity, {}).get(pp.name)
        if found is None:
            return []
        proto_name, number = found
        proto_name = proto_name.upper() if proto_name.upper() in ("TCP", "UDP", "SCTP") else proto_name
        if pp.protocol not in ("ANY", proto_name):
            return []
        return [(PROTOCOL_NUMBERS.get(proto_name, PROTO_TCP), number)]

    def _rows(self, direction: Direction, subject: int, peers: set[int], peer: PeerRule, deny: bool,
              origin: str) -> list[Row]:
        rows: list[Row] = []

        def emit(ident: int, proto: int, port: int, end: int, l7: L7Annotation | None) -> None:
            rows.append(((ident, proto, port, end), PolicyEntry(direction, ident, proto, port, end, deny),
                         l7))

        if peer.icmps:
            for f in peer.icmps:
                for ident in peers:
                    emit(ident, PROTO_ICMP if f.family == "IPv4" else PROTO_ICMPV6, icmp_type_port(f.type), 0, None)
            return rows
        if not peer.to_ports:
            for ident in peers:
                emit(ident, 0, 0, 0, None)
            return rows
        for pr in peer.to_ports:
            l7 = None
            if pr.rules is not None and pr.rules.kind:
                l7 = L7Annotation(pr.rules.kind, pr.rules, origin, pr.server_names)
            ports: tuple[PortProtocol, ...] = pr.ports or (PortProtocol(),)
            for pp in ports:
                if pp.name:
                    if direction == "ingress":
                        for proto, number in self._named(subject, pp):
                            for ident in peers:
                                emit(ident, proto, number, 0, l7)
                    else:
                        targets = peers if 0 not in peers else set(self.named_ports)
                        for ident in targets:
                            for proto, number in self._named(ident, pp):
                                emit(ident, proto, number, 0, l7)
                    continue
                for proto in self._protocols(pp.protocol, pp.port):
                    for ident in peers:
                        emit(ident, proto, pp.port, pp.end_port, l7)
        return rows

    def _peer_rows(self, direction: Direction, subject: int, peer: PeerRule, deny: bool, origin: str,
                   requires: tuple[Requirement, ...]) -> tuple[tuple[Any, ...], list[Row], frozenset[str]]:
        """Rows of one peer rule, shared by every endpoint the rule selects (unless it names ingress ports)."""
        named_ingress = direction == "ingress" and any(pp.name for pr in peer.to_ports for pp in pr.ports)
        key = (id(peer), direction, deny, requires, subject if named_ingress else 0)
        cached = self._row_cache.get(key)
        if cached is None:
            notes: set[str] = set()
            deps: set[Any] = set()
            peers = self._peers(peer, requires, notes, deps)
            rows = self._rows(direction, subject, peers, peer, deny, origin) if peers else []
            if any(pp.name for pr in peer.to_ports for pp in pr.ports):
                deps.add(("named-ports", subject) if named_ingress else NAMED_EGRESS)
            for dep in deps:
                self._row_deps.setdefault(dep, set()).add(key)
            cached = (rows, frozenset(notes))
            self._row_cache[key] = cached
        return key, cached[0], cached[1]

    def _drop_rows(self, deps: Iterable[Any]) -> None:
        """Forget cached rows that depend on any of ``deps`` and the results built from them."""
        for dep in deps:
            for key in self._row_deps.pop(dep, ()):
                self._row_cache.pop(key, None)
                for number in self._row_users.pop(key, ()):
                    self._results.pop(number, None)

    # --- compile -------------------------------------------------------------------------------
    def compile_endpoint(self, identity: int, *, namespace: str | None = None) -> CompileResult:
        """The policy of an endpoint with this identity (``namespace`` is implied by its labels)."""
        cached = self._results.get(identity)
        if cached is None:
            cached = self._results[identity] = self._compile(identity, self.rules_selecting(identity))
        return cached

    def rules_selecting_host(self) -> list[Rule]:
        """Rules whose nodeSelector selects the local node (its labels from the API, source ``node``)."""
        node = self.peer_tables.local_node
        return [r for policy in self.policies.values() for r in policy.rules
                if r.node_subject is not None and node in self._nodes_matching(r.node_subject)]

    def compile_host(self) -> CompileResult:
        """The local node's host policy (hostFirewall): its rules compiled like an endpoint's, the host
        identity as subject. Not cached: node labels are not part of the per-identity cache."""
        return self._compile(idm.RESERVED_HOST, self.rules_selecting_host())

    def _compile(self, identity: int, rules: list[Rule]) -> CompileResult:
        notes: set[str] = set()
        merged: dict[tuple[Any, ...], tuple[PolicyEntry, list[L7Annotation]]] = {}
        plain: set[tuple[Any, ...]] = set()  # slots some rule allows without L7 rules (allow every request)
        enforced = {}
        for direction in DIRECTIONS:
            if self.mode == "never":
                enforced[direction] = False
                continue
            enforced[direction] = self.mode == "always" or any(r.default_deny(direction) for r in rules)
            requires: list[Requirement] = []
            for r in rules:
                for section in r.sections(direction):
                    for peer in section:
                        for sel in peer.requires:
                            requires.extend(sel.requirements)
            req = tuple(sorted(set(requires)))
            for r in rules:
                allow, deny = r.sections(direction)
                for is_deny, section in ((False, allow), (True, deny)):
                    for peer in section:
                        key, rows, peer_notes = self._peer_rows(direction, identity, peer, is_deny, r.origin, req)
                        self._row_users.setdefault(key, set()).add(identity)
                        notes |= peer_notes
                        for row_key, entry, ann in rows:
                            slot = merged.get((direction, is_deny, row_key))
                            if slot is None:
                                slot = merged[(direction, is_deny, row_key)] = (entry, [])
                            if ann is None:
                                plain.add((direction, is_deny, row_key))
                            elif ann not in slot[1]:
                                slot[1].append(ann)
        if self.allow_localhost and enforced.get("ingress"):
            merged.setdefault(("ingress", False, "allow-localhost"),
                              (PolicyEntry("ingress", identity=idm.RESERVED_HOST), []))
        entries: list[PolicyEntry] = []
        l7: dict[PolicyEntry, tuple[L7Annotation, ...]] = {}
        unenforced: set[str] = set()
        for slot_key, (entry, anns) in merged.items():
            if anns and slot_key not in plain:
                port = proxy_port_for({a.kind for a in anns}, entry.direction)
                if port:
                    entry = replace(entry, proxy_port=port)  # the datapath hands the flow to the L7 proxy
                else:
                    unenforced.update(a.kind for a in anns)
            entries.append(entry)
            if anns:
                l7[entry] = tuple(anns)
        if unenforced:
            notes.add(f"L7 rules ({', '.join(sorted(unenforced))}) are not enforced yet: their L4 ports are allowed")
        result = CompileResult(identity=identity, ingress_enforced=enforced["ingress"],
                               egress_enforced=enforced["egress"], entries=tuple(entries), l7=l7,
                               l7_enforced=not unenforced, origins=tuple(sorted({r.origin for r in rules})),
                               notes=tuple(sorted(notes)))
        return result

    def compile_all(self, identities: Iterable[int]) -> dict[int, CompileResult]:
        return {n: self.compile_endpoint(n) for n in identities}
