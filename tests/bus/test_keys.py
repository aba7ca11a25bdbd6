"""Every KV key kind round-trips through its encoder and decoder in `bus/subjects.py`, and a decoder
tells a key of another kind (an owner's lease or watermark) from its own."""

from __future__ import annotations

import pytest

from propolis.bus import subjects
from propolis.errors import ValidationError


def test_k8s_keys_round_trip_with_dotted_names_and_cluster_scope() -> None:
    key = subjects.k8s_key("services", "prod", "web.v2-1")  # object names may hold dots (DNS subdomains)
    assert key == "services.prod.web.v2-1"
    assert subjects.parse_k8s_key(key) == subjects.K8sKey("services", "prod", "web.v2-1")
    node = subjects.k8s_key("nodes", None, "w1")
    assert node == "nodes._.w1"
    assert subjects.parse_k8s_key(node) == subjects.K8sKey("nodes", None, "w1")


def test_pod_keys_carry_the_node_so_a_node_watches_only_its_own() -> None:
    key = subjects.k8s_key("pods", "prod", "web.v2-1", node="w1")
    assert key == "pods.w1.prod.web.v2-1"
    assert subjects.parse_k8s_key(key) == subjects.K8sKey("pods", "prod", "web.v2-1", "w1")
    assert subjects.node_pods_keys("w1") == "pods.w1.>"
    assert subjects.k8s_keys("pods", "prod") == "pods.*.prod.>"  # one namespace's pods, of every node
    with pytest.raises(ValidationError):  # an unscheduled pod has no key (it is not mirrored)
        subjects.k8s_key("pods", "prod", "web")


@pytest.mark.parametrize("key", [subjects.WATERMARK_KEY, subjects.K8S_WATCHER_LEASE_KEY, "pods", "pods.ns",
                                 "pods.w1.ns"])
def test_owner_keys_and_partial_keys_are_not_k8s_objects(key: str) -> None:
    assert subjects.parse_k8s_key(key) is None


def test_lease_keys_are_owner_keys_where_they_always_were() -> None:
    assert subjects.K8S_WATCHER_LEASE_KEY == "_lease.k8s-watcher._"
    assert subjects.IDENTITY_GC_LEASE_KEY == "_lease.identity-gc"
    assert subjects.is_owner_key(subjects.IDENTITY_GC_LEASE_KEY) and not subjects.is_owner_key("id.5")


def test_identity_bucket_keys_round_trip_and_tell_each_other_apart() -> None:
    assert subjects.parse_identity_key(subjects.identity_key(70000)) == 70000
    assert subjects.parse_endpoint_key(subjects.endpoint_key("prod", "web.v2")) == ("prod", "web.v2")
    assert subjects.parse_identity_key(subjects.endpoint_key("prod", "web")) is None
    assert subjects.parse_endpoint_key(subjects.identity_key(5)) is None
    assert subjects.parse_identity_key(subjects.identity_labels_key("ab12")) is None
    assert subjects.parse_identity_key("id.x") is None
    assert subjects.IDENTITY_KEYS == "id.>" and subjects.ENDPOINT_KEYS == "endpoints.>"


def test_per_node_keys_round_trip() -> None:
    assert subjects.parse_ipcache_key(subjects.ipcache_key("w1", "10.0.0.5")) == ("w1", "10.0.0.5")
    assert subjects.ipcache_keys("w1") == "w1.>"
    hb = subjects.heartbeat_key("hubble", "w1", "i-1")
    assert subjects.parse_heartbeat_key(hb) == subjects.HeartbeatKey("hubble", "w1", "i-1")
    assert subjects.parse_heartbeat_key("hubble.w1") is None
    assert subjects.heartbeat_keys("hubble") == "hubble.*.*"
    assert subjects.heartbeat_keys("datapath-writer", "w1") == "datapath-writer.w1.*"
    assert subjects.node_of_key(subjects.wireguard_key("w1")) == "w1"
    assert subjects.node_of_key(subjects.fqdn_key("w1")) == "w1"


def test_clustermesh_keys_round_trip() -> None:
    cached = subjects.clustermesh_cache_key("c2", subjects.export_ip_key("10.2.1.5"))
    assert cached == "c2.ip.10.2.1.5"
    cluster, export_key = subjects.parse_clustermesh_cache_key(cached)
    assert cluster == "c2" and subjects.parse_export_key(export_key) == subjects.ExportKey("ip", "10.2.1.5")
    kind, rest = subjects.parse_export_key(subjects.export_service_key("prod", "api"))
    assert kind == "services" and subjects.parse_namespaced_name(rest) == ("prod", "api")
    assert subjects.parse_export_key(subjects.export_identity_key(65536 + 7)) == ("identities", "65543")
    assert subjects.parse_export_key(subjects.export_node_key("w1")) == ("nodes", "w1")


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "a*"])
def test_a_node_token_that_would_change_the_key_shape_is_refused_naming_the_field(bad: str) -> None:
    with pytest.raises(ValidationError, match="node"):
        subjects.ipcache_key(bad, "10.0.0.1")
