"""Global services: annotations (and their legacy aliases), what is exported, and the backends the LB uses."""

from __future__ import annotations

import pytest

from propolis.bus.messages import ClusterService, K8sObject
from propolis.clustermesh import imported
from propolis.lb import global_services as gs
from propolis.lb.desired import desired_services


def service(annotations: dict[str, str]) -> K8sObject:
    return K8sObject("Service", "ns", "api", "uid", "1", fields={
        "clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        "annotations": annotations})


def slice_(addresses: list[str], ready: bool = True) -> K8sObject:
    return K8sObject("EndpointSlice", "ns", "api-x", "uid", "1", labels={"kubernetes.io/service-name": "api"},
                     fields={"addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                           "endpoints": [{"addresses": addresses, "conditions": {"ready": ready}, "nodeName": "n1"}]})


@pytest.mark.parametrize("annotations,glob,shared,affinity", [
    ({}, False, True, "none"),
    ({"service.cilium.io/global": "true", "service.cilium.io/affinity": "local"}, True, True, "local"),
    ({"io.cilium/global-service": "true", "io.cilium/shared-service": "false",
      "io.cilium/service-affinity": "remote"}, True, False, "remote"),
    ({"service.cilium.io/global": "True", "service.cilium.io/affinity": "sideways"}, True, True, "none"),
])
def test_annotations_and_legacy_aliases(annotations, glob, shared, affinity):
    svc = service(annotations)
    assert (gs.is_global(svc), gs.is_shared(svc), gs.affinity(svc)) == (glob, shared, affinity)


def test_export_has_ready_backends_per_port_unless_not_shared():
    exported = gs.cluster_service("c1", 1, service({"service.cilium.io/global": "true"}),
                                  [slice_(["10.1.1.5"]), slice_(["10.1.1.6"], ready=False)])
    assert exported == ClusterService("c1", "ns", "api", True, {"http/TCP": [["10.1.1.5", 8080]]}, 1)
    hidden = gs.cluster_service("c1", 1, service({"service.cilium.io/global": "true",
                                               "service.cilium.io/shared": "false"}), [slice_(["10.1.1.5"])])
    assert hidden.shared is False and hidden.backends == {}


def lb_backends(annotations: dict[str, str], local: list[str], remote_shared: bool = True) -> set[str]:
    remote = {("ns", "api"): {"c2": ClusterService("c2", "ns", "api", remote_shared,
                                                   {"http/TCP": [["10.2.1.5", 8080]]})}}
    entries = desired_services([service(annotations)], [slice_(local)] if local else [], node_name="n1",
                               remote_backends=imported.remote_backends(remote, ("ns", "api")))
    cluster_ip = next(e for e in entries if e.frontend_type == "ClusterIP")
    return {f"{b.cluster or 'local'}:{b.ip}" for b in cluster_ip.backends}


def test_lb_backends_follow_affinity_with_failover():
    on = {"service.cilium.io/global": "true"}
    assert lb_backends(on, ["10.1.1.5"]) == {"local:10.1.1.5", "c2:10.2.1.5"}
    assert lb_backends({**on, "service.cilium.io/affinity": "local"}, ["10.1.1.5"]) == {"local:10.1.1.5"}
    assert lb_backends({**on, "service.cilium.io/affinity": "local"}, []) == {"c2:10.2.1.5"}  # failover
    assert lb_backends({**on, "service.cilium.io/affinity": "remote"}, ["10.1.1.5"]) == {"c2:10.2.1.5"}
    assert lb_backends({**on, "service.cilium.io/affinity": "remote"}, ["10.1.1.5"], remote_shared=False) == \
        {"local:10.1.1.5"}
    assert lb_backends({}, ["10.1.1.5"]) == {"local:10.1.1.5"}  # not global: remote backends ignored
