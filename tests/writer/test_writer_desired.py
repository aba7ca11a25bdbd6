"""DesiredState: the node's ipcache, per-endpoint policy and Service frontends from bus records."""

from __future__ import annotations

from propolis.bus.messages import EndpointRecord
from propolis.k8s.kinds import KINDS
from propolis.model import identity as idm
from propolis.writer.desired import DesiredState
from propolis.writer.endpoints import LocalEndpoint
from propolis.writer.inputs import ClusterInputs

NODE, OTHER = "n1", "n2"


def record(plural: str, obj: dict):  # type: ignore[no-untyped-def]
    obj.setdefault("metadata", {}).setdefault("uid", "u-" + obj["metadata"]["name"])
    obj["metadata"].setdefault("resourceVersion", "1")
    return KINDS[plural].to_record(obj)


def labels_of(app: str, ns: str = "prod") -> list[str]:
    return idm.pod_security_labels(pod_labels={"app": app}, namespace=ns, cluster="c1").strings()


def cluster_inputs() -> ClusterInputs:
    inputs = ClusterInputs()
    for name, ip in ((NODE, "172.30.1.1"), (OTHER, "172.30.1.2")):
        inputs.nodes[name] = record("nodes", {"metadata": {"name": name},
                                              "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
    inputs.identities = {300: labels_of("web"), 301: labels_of("client"), 302: labels_of("other")}
    for pod, ident, ip, node in (("web", 300, "10.0.1.2", NODE), ("client", 301, "10.0.2.2", OTHER),
                                 ("other", 302, "10.0.2.3", OTHER)):
        inputs.endpoints[("prod", pod)] = EndpointRecord("prod", pod, node, [ip], ident, inputs.identities[ident],
                                                         {"http": ["TCP", 8080]} if pod == "web" else {})
    inputs.policies["cnp"] = record("ciliumnetworkpolicies", {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "web", "namespace": "prod"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                 "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                              "toPorts": [{"ports": [{"port": "http", "protocol": "TCP"}]}]}]}})
    inputs.services[("prod", "web")] = record("services", {
        "metadata": {"name": "web", "namespace": "prod"},
        "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP", "nodePort": 30080}]}})
    inputs.endpointslices[("prod", "web-abc")] = record("endpointslices", {
        "metadata": {"name": "web-abc", "namespace": "prod", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.0.1.2"], "conditions": {"ready": True}, "nodeName": NODE}]})
    inputs.policy_generation = 1
    return inputs


LOCAL = [LocalEndpoint(1, "c1", "prod", "web", "10.0.1.2", 5, "lxc1", "/proc/1/ns/net", identity=300)]


def test_ipcache_names_this_node_host_and_others_remote_node():
    desired = DesiredState(NODE, cluster_name="c1")
    desired.update(cluster_inputs(), LOCAL)
    assert desired.ipcache["172.30.1.1/32"].identity == idm.RESERVED_HOST
    assert desired.ipcache["172.30.1.2/32"].identity == idm.RESERVED_REMOTE_NODE
    assert desired.ipcache["10.0.2.2/32"].identity == 301


def test_local_endpoint_gets_named_port_rule_from_client_only():
    desired = DesiredState(NODE, cluster_name="c1")
    desired.update(cluster_inputs(), LOCAL)
    pol = desired.policies[1]
    assert pol.ingress_enforced and not pol.egress_enforced and not pol.l7_pending
    assert {(e.direction, e.identity, e.protocol, e.port, e.deny) for e in pol.entries} == \
        {("ingress", 301, 6, 8080, False)}


def test_services_include_clusterip_and_nodeport_on_this_node_ip():
    desired = DesiredState(NODE, cluster_name="c1")
    desired.update(cluster_inputs(), LOCAL)
    frontends = {(s.frontend_type, s.ip, s.port) for s in desired.services}
    assert frontends == {("ClusterIP", "10.96.0.10", 80), ("NodePort", "172.30.1.1", 30080)}
    assert [[(b.ip, b.port) for b in s.backends] for s in desired.services] == [[("10.0.1.2", 8080)]] * 2


def test_an_invalid_service_is_reported_and_the_others_stay():
    inputs = cluster_inputs()
    inputs.services[("prod", "bad")] = record("services", {
        "metadata": {"name": "bad", "namespace": "prod"},
        "spec": {"clusterIP": "10.96.0.11", "sessionAffinity": "ClientIP",
                 "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 999999}},
                 "ports": [{"name": "x", "port": 81, "protocol": "TCP"}]}})
    desired = DesiredState(NODE, cluster_name="c1")
    desired.update(inputs, LOCAL)
    assert "timeoutSeconds" in desired.service_errors["prod/bad"]
    assert ("ClusterIP", "10.96.0.10", 80) in {(s.frontend_type, s.ip, s.port) for s in desired.services}
