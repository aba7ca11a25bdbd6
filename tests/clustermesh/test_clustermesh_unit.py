"""Cluster Mesh library: the export, what KVStoreMesh imports, and what `clustermesh connect` refuses."""

from __future__ import annotations

import pytest

from propolis.bus.messages import ClusterConfig, EndpointRecord, IdentityRecord, IpcacheEntry, K8sObject
from propolis.clustermesh import imported
from propolis.clustermesh.export import desired_export
from propolis.clustermesh.kvstoremesh import importable, refusal
from propolis.clustermesh.remotes import RemoteCluster, load_remotes, save_remote
from propolis.errors import ValidationError
from propolis.model import identity as idm
from propolis_sandbox.clustermesh import check_pair
from propolis_sandbox.config import SandboxState


def node(name: str, ip: str, cidr: str) -> K8sObject:
    return K8sObject("Node", "", name, "uid", "1", fields={"podCIDRs": [cidr]},
                     status={"addresses": [{"type": "InternalIP", "address": ip}]})


def test_export_holds_own_identities_nodes_and_endpoint_ips_only():
    own, foreign = idm.cluster_identity(300, 3), idm.cluster_identity(300, 4)
    out = desired_export(
        cluster_name="c3", cluster_id=3, nodes={"n1": node("n1", "172.30.1.1", "10.1.1.0/24")},
        identities=[IdentityRecord(own, ["k8s:app=a"]), IdentityRecord(foreign, ["k8s:app=x"]),
                    IdentityRecord(2, ["reserved:world"], reserved=True)],
        endpoints=[EndpointRecord("ns", "a", "n1", ["10.1.1.5", "fd00::5"], own, [])])
    assert out["cluster-config"] == ClusterConfig("c3", 3, ["10.1.1.0/24"])
    assert out["nodes.n1"].ips == ["172.30.1.1"] and out["nodes.n1"].pod_cidrs == ["10.1.1.0/24"]
    assert out["ip.10.1.1.5"] == IpcacheEntry("10.1.1.5", 32, own, "n1", "172.30.1.1")
    assert f"identities.{own}" in out and f"identities.{foreign}" not in out and "identities.2" not in out
    assert not any("fd00" in k for k in out)


def test_a_remote_speaks_only_for_its_own_identity_range():
    remote = RemoteCluster("c2", 2, "nats://x", "u", "p")
    assert importable(remote, "identities.1", IdentityRecord(idm.cluster_identity(400, 2), []))
    assert not importable(remote, "identities.1", IdentityRecord(idm.cluster_identity(400, 1), []))
    assert not importable(remote, "identities.1", IdentityRecord(6, ["reserved:remote-node"]))
    assert importable(remote, "identities.1", None)  # a deletion


@pytest.mark.parametrize("config,why", [
    (None, "no cluster-config"),
    (ClusterConfig("c9", 2, []), "announces cluster 'c9'"),
    (ClusterConfig("c2", 1, []), "announces cluster 'c2' id 1"),
])
def test_a_remote_announcing_another_identity_is_refused(config, why):
    assert why in refusal("c1", 1, RemoteCluster("c2", 2, "nats://x", "u", "p"), config)


def test_a_remote_clashing_with_the_local_cluster_is_refused():
    assert "same cluster id 1" in refusal("c1", 1, RemoteCluster("c2", 1, "nats://x", "u", "p"), ClusterConfig("c2", 1, []))
    assert "same name" in refusal("c1", 1, RemoteCluster("c1", 2, "nats://x", "u", "p"), ClusterConfig("c1", 2, []))
    assert refusal("c1", 1, RemoteCluster("c2", 2, "nats://x", "u", "p"), ClusterConfig("c2", 2, [])) == ""


def state(name: str, cluster_id: int, cidr: str, index: int) -> SandboxState:
    return SandboxState(config={"name": name, "nodes": 2, "index": index, "cluster_cidr": cidr,
                                "service_cidr": "10.96.0.0/16", "cluster_id": cluster_id})


def test_connect_refuses_duplicate_ids_overlapping_cidrs_and_clusters_without_id():
    with pytest.raises(ValidationError, match="clusters 'c1' and 'c2' have the same cluster id 1"):
        check_pair(state("c1", 1, "10.244.0.0/16", 1), state("c2", 1, "10.245.0.0/16", 2))
    with pytest.raises(ValidationError, match=r"'c1' \(10.244.0.0/16\) and 'c2' \(10.244.0.0/17\).*overlapping"):
        check_pair(state("c1", 1, "10.244.0.0/16", 1), state("c2", 2, "10.244.0.0/17", 2))
    with pytest.raises(ValidationError, match="cluster 'c2' has no cluster id"):
        check_pair(state("c1", 1, "10.244.0.0/16", 1), state("c2", 0, "10.245.0.0/16", 2))
    with pytest.raises(ValidationError, match="cannot connect to itself"):
        check_pair(state("c1", 1, "10.244.0.0/16", 1), state("c1", 1, "10.244.0.0/16", 1))
    check_pair(state("c1", 1, "10.244.0.0/16", 1), state("c2", 2, "10.245.0.0/16", 2))


def test_remote_configs_are_root_only_and_validated(tmp_path):
    save_remote(tmp_path, RemoteCluster("c2", 2, "nats://127.0.0.1:1", "clustermesh-remote", "secret"))
    assert (tmp_path / "c2.json").stat().st_mode & 0o777 == 0o600
    (tmp_path / "bad.json").write_text('{"name": "Bad_Name", "id": 0}')
    assert list(load_remotes(tmp_path)) == ["c2"]
    with pytest.raises(ValidationError, match="cluster.id"):
        save_remote(tmp_path, RemoteCluster("c3", 256, "nats://x", "u", "p"))


def test_a_remote_endpoint_lives_in_a_namespace_no_pod_can_have():
    rec = imported.remote_endpoint("c2", IpcacheEntry("10.2.1.5", 32, idm.cluster_identity(300, 2), "n1", "172.30.2.1"))
    assert rec is not None and rec.namespace == "@c2" and rec.ips == ["10.2.1.5"]
    assert imported.split_cache_key("c2.ip.10.2.1.5") == ("c2", "ip", "10.2.1.5")
    assert imported.remote_endpoint("c2", "garbage") is None


def test_remote_cluster_rows_reach_the_desired_ipcache():
    from propolis.bus.kv import EventType, KvEvent
    from propolis.bus.messages import ClusterNode
    from propolis.writer.desired import DesiredState
    from propolis.writer.inputs import ClusterInputs

    number = idm.cluster_identity(300, 2)
    inputs = ClusterInputs()
    for key, value in (("c2.nodes.c2-worker", ClusterNode("c2", "c2-worker", ["172.30.2.1"], ["10.2.1.0/24"])),
                       (f"c2.identities.{number}", IdentityRecord(number, ["k8s:app=b"])),
                       ("c2.ip.10.2.1.5", IpcacheEntry("10.2.1.5", 32, number, "c2-worker", "172.30.2.1"))):
        inputs.apply_clustermesh(KvEvent(EventType.PUT, key, value, 1))
    desired = DesiredState(node="c1-worker", cluster_name="c1")
    desired.update(inputs, [])
    assert desired.ipcache["10.2.1.5/32"].identity == number
    assert desired.ipcache["172.30.2.1/32"].identity == idm.RESERVED_REMOTE_NODE
    inputs.apply_clustermesh(KvEvent(EventType.DELETE, "c2.ip.10.2.1.5", None, 2))
    inputs.apply_clustermesh(KvEvent(EventType.DELETE, "c2.nodes.c2-worker", None, 3))
    desired.update(inputs, [])
    assert "10.2.1.5/32" not in desired.ipcache and "172.30.2.1/32" not in desired.ipcache
