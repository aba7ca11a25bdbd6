"""`propolis endpoint list`: each endpoint's enforcement and state (ready / regenerating / not-ready, why),
from what the node's datapath-writer reports, joined with the identities bucket."""

from __future__ import annotations

import time

from propolis.bus import codec
from propolis.bus.messages import EndpointRecord, Heartbeat
from propolis.cli.identity_cmd import endpoint_rows, writer_states
from propolis.reconcile import ObjectStatus, Status
from propolis.writer.endpoint_state import NOT_READY, READY, REGENERATING, endpoint_states
from propolis.writer.endpoints import LocalEndpoint
from propolis.writer.targets import EndpointPolicy


def local(ep_id: int, pod: str, identity: int) -> LocalEndpoint:
    return LocalEndpoint(ep_id, "c1", "prod", pod, f"10.0.1.{ep_id}", ep_id, f"lxc{ep_id}", "/proc/1/ns/net",
                         identity=identity)


def test_states_follow_the_reconciler_and_the_compiler():
    eps = [local(1, "ready", 300), local(2, "pending", 301), local(3, "big", 302), local(4, "new", 0),
           local(5, "bad", 303), local(6, "retry", 304)]
    policy = EndpointPolicy(frozenset(), True, False)
    statuses = {1: ObjectStatus(Status.DONE, 1), 2: ObjectStatus(Status.PENDING, 2),
                3: ObjectStatus(Status.FAILED, 1, "entries: 17001 rows exceed the policy map size 16384"),
                6: ObjectStatus(Status.ERROR, 3, "map busy")}
    states = endpoint_states(eps, {n: policy for n in (1, 2, 3, 5, 6)}, statuses, {5: "ValidationError: x"})
    assert {k: v["state"] for k, v in states.items()} == {
        "prod/ready": READY, "prod/pending": REGENERATING, "prod/big": NOT_READY, "prod/new": NOT_READY,
        "prod/bad": NOT_READY, "prod/retry": NOT_READY}
    assert "17001 rows" in states["prod/big"]["reason"] and "last enforced state kept" in states["prod/big"]["reason"]
    assert "identity" in states["prod/new"]["reason"] and "retrying" in states["prod/retry"]["reason"]
    assert states["prod/ready"]["ingress"] is True and states["prod/ready"]["egress"] is False


def test_rows_join_records_with_the_live_writer_of_each_node():
    now = time.time()
    states = endpoint_states([local(1, "web", 300)], {1: EndpointPolicy(frozenset(), True, True)},
                             {1: ObjectStatus(Status.DONE, 1)}, {})

    def beat(node: str, age: float) -> Heartbeat:
        hb = Heartbeat(service="datapath-writer", node=node, instance=node, version="0", pid=1, started_at=now - 60,
                       sent_at=now - age, health="ok", components={}, progress={"endpoint_states": states},
                       interval=2.0)
        return codec.decode(codec.encode(hb), Heartbeat)  # as read from KV

    records = [EndpointRecord("prod", "web", "w1", ["10.0.1.1"], 300, ["k8s:app=web"], {}),
               EndpointRecord("prod", "db", "w1", ["10.0.1.9"], 301, ["k8s:app=db"], {}),
               EndpointRecord("prod", "far", "w2", ["10.0.2.1"], 302, ["k8s:app=far"], {})]
    rows = {r["pod"]: r for r in endpoint_rows(records, writer_states([beat("w1", 1), beat("w2", 60)], now))}
    assert rows["web"]["state"] == READY and rows["web"]["endpointID"] == 1
    assert rows["web"]["policyEnforcement"] == {"ingress": "Enabled", "egress": "Enabled"}
    assert rows["db"]["state"] == NOT_READY and "not written" in rows["db"]["reason"]
    assert rows["far"]["state"] == NOT_READY and "no live datapath-writer on node w2" in rows["far"]["reason"]


def test_policy_failures_name_every_policy_selecting_a_failed_endpoint_and_gather_per_node():
    from propolis.k8s.kinds import KINDS
    from propolis.k8s.status import gather_failures, origin_of, policy_conditions
    from propolis.model import identity as idm
    from propolis.policy.engine import PolicyEngine
    from propolis.writer.endpoint_state import policy_failures

    web = idm.pod_security_labels(pod_labels={"app": "web"}, namespace="prod", cluster="c1").strings()
    pol = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "web", "namespace": "prod"},
           "spec": {"endpointSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"fromEndpoints": [{}]}]}}
    engine = PolicyEngine(cluster_name="c1")
    engine.update(policies=[pol], identities={300: web, 301: web})
    eps = [local(1, "web", 300), local(2, "web2", 301), local(3, "idle", 0)]
    failures = policy_failures(eps, engine, {1: "entries: 17001 rows exceed the policy map size 16384", 3: "x"})
    assert failures == {"CiliumNetworkPolicy/prod/web": {"prod/web": "entries: 17001 rows exceed the policy map size 16384"}}

    now = time.time()

    def beat(node: str, sent: float, reported: dict) -> Heartbeat:
        return Heartbeat(service="datapath-writer", node=node, instance=f"{node}-{sent}", version="0", pid=1,
                         started_at=sent, sent_at=sent, health="ok", components={},
                         progress={"policy_failures": reported}, interval=2.0)

    gathered = gather_failures([beat("w1", now - 30, failures), beat("w1", now, failures),
                                beat("w2", now - 30, failures), beat("w2", now, {})])  # w2 recovered
    kind = KINDS["ciliumnetworkpolicies"]
    assert gathered == {origin_of(kind, pol): {"w1": failures["CiliumNetworkPolicy/prod/web"]}}
    conditions = policy_conditions(pol, None, gathered[origin_of(kind, pol)])
    assert [c["type"] for c in conditions] == ["Valid", "Enforced"]
    assert conditions[1]["status"] == "False" and "node w1: endpoint prod/web: entries" in conditions[1]["message"]
