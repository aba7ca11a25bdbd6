"""allow-localhost: an ingress-enforcing endpoint still admits its own node (Cilium's allow-localhost=always,
Kubernetes' "traffic to and from the node where a Pod is running is always allowed"), unless denied."""

from __future__ import annotations

from propolis.model import identity as idm
from propolis.policy.engine import PolicyEngine
from propolis.policy.entries import PolicyEntry

SERVER = 1000
LABELS = {SERVER: idm.pod_security_labels(pod_labels={"app": "server"}, namespace="default",
                                          namespace_labels={}, cluster="default").strings()}


def netpol_deny_all() -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny", "namespace": "default"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}


def host_rows(engine: PolicyEngine) -> list[PolicyEntry]:
    return [e for e in engine.compile_endpoint(SERVER).entries if e.identity == idm.RESERVED_HOST]


def engine(allow_localhost: bool, policies: list[dict]) -> PolicyEngine:
    e = PolicyEngine(cluster_name="default", allow_localhost=allow_localhost)
    e.update(policies=policies, identities=LABELS)
    assert not e.errors, e.errors
    return e


def test_host_allowed_in_ingress_only_when_enforced():
    rows = host_rows(engine(True, [netpol_deny_all()]))
    assert rows == [PolicyEntry("ingress", identity=idm.RESERVED_HOST)]  # egress to the host stays denied
    assert host_rows(engine(True, [])) == []  # nothing enforced: nothing to add
    assert host_rows(engine(False, [netpol_deny_all()])) == []  # allow-localhost=policy


def test_a_deny_naming_the_host_is_kept_beside_it():
    deny_host = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                 "metadata": {"name": "no-host", "namespace": "default"},
                 "spec": {"endpointSelector": {}, "ingressDeny": [{"fromEntities": ["host"]}]}}
    rows = host_rows(engine(True, [netpol_deny_all(), deny_host]))
    assert PolicyEntry("ingress", identity=idm.RESERVED_HOST, deny=True) in rows
