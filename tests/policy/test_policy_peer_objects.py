"""Peers resolved through cluster objects, as one node's writer computes them (inputs -> ipcache + rows).

kube-apiserver and health are ipcache rows (reserved identities 7 and 4); toServices, labelled
toNodes/fromNodes and CIDR groups select identities through Services/EndpointSlices, Nodes and
CiliumCIDRGroups; an authentication-required rule allows nothing (fail closed).
"""

from __future__ import annotations

from propolis.bus.kv import EventType, KvEvent
from propolis.bus.messages import EndpointRecord
from propolis.k8s.kinds import KINDS
from propolis.model import identity as idm
from propolis.policy.engine import NODE_IDENTITY_BASE, entity_selectors
from propolis.writer.desired import DesiredState
from propolis.writer.endpoints import LocalEndpoint
from propolis.writer.inputs import ClusterInputs

NODE, OTHER, THIRD = "n1", "n2", "n3"
NODE_IPS = {NODE: "172.30.1.1", OTHER: "172.30.1.2", THIRD: "172.30.1.3"}
CLIENT, WEB, DB = 300, 301, 302
TCP = 6


def record(plural: str, obj: dict):  # type: ignore[no-untyped-def]
    obj.setdefault("metadata", {}).setdefault("uid", "u-" + obj["metadata"]["name"])
    obj["metadata"].setdefault("resourceVersion", "1")
    return KINDS[plural].to_record(obj)


def labels_of(app: str) -> list[str]:
    return idm.pod_security_labels(pod_labels={"app": app}, namespace="prod", cluster="c1").strings()


def service(inputs: ClusterInputs, name: str, addresses: list[str], labels: dict | None = None,
            ns: str = "prod") -> None:
    """Through the k8s watch's change path (as the writer gets them), so its indexes follow."""
    for plural, key, value in (
            ("services", name, record("services", {
                "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
                "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.20", "ports": [{"port": 443, "protocol": "TCP"}]}})),
            ("endpointslices", name + "-x", record("endpointslices", {
                "metadata": {"name": name + "-x", "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4", "ports": [{"port": 443, "protocol": "TCP"}],
                "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses]}))):
        inputs.apply_k8s_released(KvEvent(EventType.PUT, f"{plural}.{ns}.{key}", value, 1))


def cluster(egress: list[dict]) -> ClusterInputs:
    inputs = ClusterInputs()
    for name, ip in NODE_IPS.items():
        inputs.nodes[name] = record("nodes", {
            "metadata": {"name": name, "labels": {"zone": "a" if name != THIRD else "b"},
                         "annotations": {"network.cilium.io/ipv4-health-ip": ip.replace("172.30.1.", "10.0.9.")}},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
    inputs.identities = {CLIENT: labels_of("client"), WEB: labels_of("web"), DB: labels_of("db")}
    for pod, ident, ip in (("client", CLIENT, "10.0.1.2"), ("web", WEB, "10.0.2.2"), ("db", DB, "10.0.2.3")):
        inputs.endpoints[("prod", pod)] = EndpointRecord("prod", pod, NODE, [ip], ident, inputs.identities[ident], {})
    inputs.policies["cnp"] = record("ciliumnetworkpolicies", {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "client", "namespace": "prod"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "client"}}, "egress": egress}})
    inputs.policy_generation = 1
    return inputs


LOCAL = [LocalEndpoint(1, "c1", "prod", "client", "10.0.1.2", 5, "lxc1", "/proc/1/ns/net", identity=CLIENT)]


def compiled(inputs: ClusterInputs) -> tuple[DesiredState, set[tuple[int, int, int]]]:
    desired = DesiredState(NODE, cluster_name="c1")
    desired.update(inputs, LOCAL)
    assert not desired.engine.errors, desired.engine.errors
    pol = desired.policies[1]
    assert pol.egress_enforced
    return desired, {(e.identity, e.protocol, e.port) for e in pol.entries if e.direction == "egress"}


def test_kube_apiserver_addresses_carry_identity_7_and_the_entity_allows_only_them():
    inputs = cluster([{"toEntities": ["kube-apiserver"], "toPorts": [{"ports": [{"port": "6443", "protocol": "TCP"}]}]}])
    service(inputs, "kubernetes", [NODE_IPS[OTHER], "192.0.2.10"], ns="default")
    desired, rows = compiled(inputs)
    assert rows == {(idm.RESERVED_KUBE_APISERVER, TCP, 6443)}
    assert desired.ipcache[f"{NODE_IPS[OTHER]}/32"].identity == idm.RESERVED_KUBE_APISERVER  # was remote-node
    assert desired.ipcache["192.0.2.10/32"].identity == idm.RESERVED_KUBE_APISERVER  # external API server
    assert desired.ipcache[f"{NODE_IPS[NODE]}/32"].identity == idm.RESERVED_HOST
    assert desired.ipcache[f"{NODE_IPS[THIRD]}/32"].identity == idm.RESERVED_REMOTE_NODE
    inputs.apply_k8s_released(KvEvent(EventType.DELETE, "endpointslices.default.kubernetes-x"))  # nothing is 7 now
    desired.update(inputs, LOCAL)
    assert idm.RESERVED_KUBE_APISERVER not in {e.identity for e in desired.ipcache.values()}


def test_this_nodes_own_address_stays_host_when_it_serves_the_api():
    inputs = cluster([{"toEntities": ["kube-apiserver"]}])
    service(inputs, "kubernetes", [NODE_IPS[NODE]], ns="default")
    desired, _ = compiled(inputs)
    assert desired.ipcache[f"{NODE_IPS[NODE]}/32"].identity == idm.RESERVED_HOST


def test_health_addresses_carry_identity_4():
    desired, rows = compiled(cluster([{"toEntities": ["health"]}]))
    assert rows == {(idm.RESERVED_HEALTH, 0, 0)}
    assert {k for k, v in desired.ipcache.items() if v.identity == idm.RESERVED_HEALTH} == \
        {"10.0.9.1/32", "10.0.9.2/32", "10.0.9.3/32"}


def test_to_services_by_name_selects_the_backends_identities_and_external_addresses():
    inputs = cluster([{"toServices": [{"k8sService": {"serviceName": "web"}}]}])
    service(inputs, "web", ["10.0.2.2", "203.0.113.7"])
    service(inputs, "db", ["10.0.2.3"])
    desired, rows = compiled(inputs)
    external = desired.engine.cidr_identities()["203.0.113.7/32"]
    assert rows == {(WEB, 0, 0), (external, 0, 0)}  # the db Service's backend stays denied
    assert desired.ipcache["203.0.113.7/32"].identity == external
    assert desired.ipcache["10.0.2.2/32"].identity == WEB  # the pod's own row wins
    # The Service's endpoints move: the rows follow.
    service(inputs, "web", ["10.0.2.3"])
    desired.update(inputs, LOCAL)
    assert {(e.identity, e.protocol, e.port) for e in desired.policies[1].entries} == {(DB, 0, 0)}
    assert "203.0.113.7/32" not in desired.engine.cidr_identities()


def test_to_services_by_selector_and_namespace():
    inputs = cluster([{"toServices": [{"k8sServiceSelector": {"selector": {"matchLabels": {"tier": "data"}},
                                                             "namespace": "prod"}}]}])
    service(inputs, "web", ["10.0.2.2"], labels={"tier": "front"})
    service(inputs, "db", ["10.0.2.3"], labels={"tier": "data"})
    service(inputs, "db", ["10.0.2.2"], labels={"tier": "data"}, ns="other")  # another namespace: not selected
    _, rows = compiled(inputs)
    assert rows == {(DB, 0, 0)}


def test_labelled_to_nodes_gives_matching_nodes_a_node_identity():
    inputs = cluster([{"toNodes": [{"matchLabels": {"zone": "a"}}]}])
    desired, rows = compiled(inputs)
    other = NODE_IDENTITY_BASE | (0x1E0102)  # 172.30.1.2's low 24 bits
    assert rows == {(idm.RESERVED_HOST, 0, 0), (other, 0, 0)}  # n1 (this node) and n2, not n3 (zone b)
    assert desired.ipcache[f"{NODE_IPS[OTHER]}/32"].identity == other
    assert desired.ipcache[f"{NODE_IPS[THIRD]}/32"].identity == idm.RESERVED_REMOTE_NODE
    # A node identity is still a remote node: the remote-node entity keeps selecting it.
    (remote_node,) = entity_selectors("remote-node")
    assert other in desired.engine.cache.select(remote_node)
    # Relabel n3 into zone a: it joins.
    inputs.nodes[THIRD].labels["zone"] = "a"
    desired.update(inputs, LOCAL)
    third = NODE_IDENTITY_BASE | 0x1E0103
    assert third in {e.identity for e in desired.policies[1].entries}
    assert desired.ipcache[f"{NODE_IPS[THIRD]}/32"].identity == third


def test_cidr_group_ref_and_selector_select_the_groups_cidrs():
    def group(name: str, cidrs: list[str], labels: dict) -> None:
        inputs.cidr_groups[name] = record("ciliumcidrgroups", {
            "metadata": {"name": name, "labels": labels}, "spec": {"externalCIDRs": cidrs}})

    inputs = cluster([{"toCIDRSet": [{"cidrGroupRef": "partners"}]},
                      {"toCIDRSet": [{"cidrGroupSelector": {"matchLabels": {"kind": "vendor"}}}],
                       "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}])
    group("partners", ["198.51.100.0/24"], {})
    group("vendor-a", ["192.0.2.0/28", "192.0.2.64/28"], {"kind": "vendor"})
    group("vendor-b", ["203.0.113.0/24"], {"kind": "other"})
    desired, rows = compiled(inputs)
    ids = desired.engine.cidr_identities()
    assert rows == {(ids["198.51.100.0/24"], 0, 0), (ids["192.0.2.0/28"], TCP, 443), (ids["192.0.2.64/28"], TCP, 443)}
    assert "203.0.113.0/24" not in ids
    assert desired.ipcache["198.51.100.0/24"].identity == ids["198.51.100.0/24"]
    # The group changes: the rows follow without a policy change.
    group("partners", ["198.51.100.128/25"], {})
    desired.update(inputs, LOCAL)
    ids = desired.engine.cidr_identities()
    assert (ids["198.51.100.128/25"], 0, 0) in {(e.identity, e.protocol, e.port) for e in desired.policies[1].entries}
    assert "198.51.100.0/24" not in ids


def test_authentication_required_allows_nothing():
    _, rows = compiled(cluster([{"toEndpoints": [{"matchLabels": {"app": "web"}}],
                                 "authentication": {"mode": "required"}},
                                {"toEndpoints": [{"matchLabels": {"app": "db"}}],
                                 "authentication": {"mode": "disabled"}}]))
    assert rows == {(DB, 0, 0)}
