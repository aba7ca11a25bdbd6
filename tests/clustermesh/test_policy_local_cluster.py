"""policy-default-local-cluster: a peer selector naming no cluster selects only the local cluster's endpoints."""

from __future__ import annotations

import pytest

from propolis.model import identity as idm
from propolis.policy.engine import PolicyEngine

LOCAL_CLIENT, REMOTE_CLIENT, SERVER = idm.cluster_identity(300, 1), idm.cluster_identity(300, 2), \
    idm.cluster_identity(301, 1)


def labels(app: str, cluster: str) -> list[str]:
    return idm.pod_security_labels(pod_labels={"app": app}, namespace="mesh", cluster=cluster).strings()


IDENTITIES = {LOCAL_CLIENT: labels("client", "c1"), REMOTE_CLIENT: labels("client", "c2"), SERVER: labels("server", "c1")}


def peers(from_labels: dict[str, str], *, default_local_cluster: bool) -> set[int]:
    engine = PolicyEngine(cluster_name="c1", default_local_cluster=default_local_cluster)
    engine.update(identities=IDENTITIES, policies=[{
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "p", "namespace": "mesh"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "server"}},
                 "ingress": [{"fromEndpoints": [{"matchLabels": from_labels}]}]}}])
    assert not engine.errors
    return {e.identity for e in engine.compile_endpoint(SERVER).entries if e.direction == "ingress"}


@pytest.mark.parametrize("from_labels,on,expected", [
    ({"app": "client"}, True, {LOCAL_CLIENT}),
    ({"app": "client"}, False, {LOCAL_CLIENT, REMOTE_CLIENT}),
    ({"app": "client", "io.cilium.k8s.policy.cluster": "c2"}, True, {REMOTE_CLIENT}),
    ({"app": "client", "io.cilium.k8s.policy.cluster": "c1"}, False, {LOCAL_CLIENT}),
])
def test_selectors_without_a_cluster_select_the_local_cluster(from_labels, on, expected):
    assert peers(from_labels, default_local_cluster=on) - {idm.RESERVED_HOST} == expected
