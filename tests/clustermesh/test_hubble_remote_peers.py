"""Hubble names a remote cluster's peer: identity, labels, cluster_name and namespace from the mesh cache."""

from __future__ import annotations

from propolis.bus.messages import IdentityRecord, IpcacheEntry
from propolis.hubble.flow import Enricher
from propolis.model import identity as idm


def test_a_remote_peer_carries_its_cluster_name():
    number = idm.cluster_identity(300, 2)
    labels = idm.pod_security_labels(pod_labels={"app": "b"}, namespace="mesh", cluster="c2").strings()
    enricher = Enricher(cluster_name="c1")
    enricher.clustermesh_event(f"c2.identities.{number}", IdentityRecord(number, labels))
    enricher.clustermesh_event("c2.ip.10.2.1.5", IpcacheEntry("10.2.1.5", 32, number, "c2-worker", ""))
    peer = enricher.endpoint("10.2.1.5", 0)
    assert peer["identity"] == number and peer["cluster_name"] == "c2" and peer["namespace"] == "mesh"
    enricher.clustermesh_event("c2.ip.10.2.1.5", None)
    assert enricher.endpoint("10.2.1.5", 0)["identity"] == 0
