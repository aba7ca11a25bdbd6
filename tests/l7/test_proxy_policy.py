"""Which HTTP rules judge a redirected connection (`ProxyPolicy`): the endpoint's and peer's identities
from the ipcache, the rules of the entries redirected to that listener, nothing before the inputs are synced."""

from __future__ import annotations

from propolis.bus.kv import EventType, KvEvent
from propolis.bus.messages import EndpointRecord, IpcacheEntry, Watermark
from propolis.k8s.kinds import KINDS
from propolis.l7.http import Head, allowed
from propolis.l7.policy import ProxyPolicy
from propolis.model import identity as idm
from propolis.policy.proxy_ports import PROXY_PORTS

NODE = "n1"
INGRESS, EGRESS = PROXY_PORTS[("http", "ingress")], PROXY_PORTS[("http", "egress")]
API, FRONT, OTHER = ("10.0.1.2", 8080), ("10.0.2.2", 40000), ("10.0.2.3", 40001)


def record(plural: str, obj: dict):  # type: ignore[no-untyped-def]
    obj.setdefault("metadata", {}).setdefault("uid", "u-" + obj["metadata"]["name"])
    obj["metadata"].setdefault("resourceVersion", "1")
    return KINDS[plural].to_record(obj)


def labels_of(app: str) -> list[str]:
    return idm.pod_security_labels(pod_labels={"app": app}, namespace="prod", cluster="default").strings()


def proxy_policy(*, synced: bool = True) -> ProxyPolicy:
    policy = ProxyPolicy(NODE, cluster_name="default")
    inputs = policy.inputs
    inputs.identities = {300: labels_of("api"), 301: labels_of("frontend"), 302: labels_of("other")}
    for pod, ident, ip in (("api", 300, API[0]), ("frontend", 301, FRONT[0]), ("other", 302, OTHER[0])):
        inputs.endpoints[("prod", pod)] = EndpointRecord("prod", pod, NODE, [ip], ident, inputs.identities[ident], {})
        policy.ipcache_event(KvEvent(EventType.PUT, f"{NODE}.{ip}", IpcacheEntry(ip, 32, ident, NODE), 1))
    inputs.policies["cnp"] = record("ciliumnetworkpolicies", {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "api", "namespace": "prod"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "api"}},
                 "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}],
                              "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}],
                                           "rules": {"http": [{"method": "GET", "path": "/api/v1/users"}]}}]}]}})
    inputs.policy_generation = 1
    if synced:
        for gate in (inputs.k8s_gate, inputs.identities_gate):
            gate.synced, gate.watermark = True, Watermark(1, 0.0, "e")
    return policy


def get(path: str) -> Head:
    return Head(method="GET", url=path)


def test_ingress_rules_of_the_server_for_the_clients_identity():
    verdict = proxy_policy().http_verdict("ingress", INGRESS, FRONT, API)
    assert (verdict.endpoint_identity, verdict.peer_identity) == (300, 301)
    assert verdict.policies == ("CiliumNetworkPolicy/prod/api",)
    assert allowed(verdict.rules, get("/api/v1/users")) and not allowed(verdict.rules, get("/api/v1/other"))


def test_no_entry_for_this_peer_port_or_listener_means_no_rule():
    policy = proxy_policy()
    assert policy.http_verdict("ingress", INGRESS, OTHER, API).rules == ()  # another peer
    assert policy.http_verdict("ingress", INGRESS, FRONT, ("10.0.1.2", 9090)).rules == ()  # another port
    assert policy.http_verdict("egress", EGRESS, FRONT, API).rules == ()  # the client has no egress rule


def test_unsynced_inputs_and_unknown_addresses_judge_nothing_allowed():
    assert proxy_policy(synced=False).http_verdict("ingress", INGRESS, FRONT, API).rules == ()
    verdict = proxy_policy().http_verdict("ingress", INGRESS, ("192.0.2.9", 1), API)
    assert verdict.peer_identity == idm.RESERVED_WORLD and verdict.rules == ()


def test_an_ipcache_row_deleted_on_one_node_keeps_the_address_another_node_owns():
    policy = proxy_policy()
    policy.ipcache_event(KvEvent(EventType.PUT, f"n2.{API[0]}", IpcacheEntry(API[0], 32, 300, "n2"), 2))
    policy.ipcache_event(KvEvent(EventType.DELETE, f"{NODE}.{API[0]}", None, 3))
    assert policy.identity_of(API[0]) == 300
    policy.ipcache_event(KvEvent(EventType.DELETE, f"n2.{API[0]}", None, 4))
    assert policy.identity_of(API[0]) == idm.RESERVED_WORLD
