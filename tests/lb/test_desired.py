"""Desired LB state from Service + EndpointSlice records (pure logic) and Maglev tables."""

from __future__ import annotations

from collections import Counter

import pytest

from propolis.bus.messages import K8sObject
from propolis.errors import ValidationError
from propolis.k8s.kinds import KINDS
from propolis.lb import BACKEND_ACTIVE, BACKEND_TERMINATING, desired_services, maglev_table
from propolis.lb.maglev import is_prime


def svc(name: str = "web", **spec) -> K8sObject:
    obj = {"metadata": {"name": name, "namespace": "default", "uid": "u"},
           "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": "web",
                                                          "protocol": "TCP"}], **spec}}
    return KINDS["services"].to_record(obj)


def endpoint(ip: str, node: str = "n1", ready=True, terminating=None, serving=None) -> dict:
    cond = {"ready": ready}
    if terminating is not None:
        cond["terminating"] = terminating
    if serving is not None:
        cond["serving"] = serving
    return {"addresses": [ip], "conditions": cond, "nodeName": node}


def eps(*endpoints: dict, service: str = "web", name: str = "web-abc", ports=None) -> K8sObject:
    obj = {"metadata": {"name": name, "namespace": "default", "uid": "s",
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "endpoints": list(endpoints),
           "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}]}
    return KINDS["endpointslices"].to_record(obj)


def test_clusterip_with_ready_and_terminating_backends():
    out = desired_services([svc()], [eps(endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=False),
                                         endpoint("10.0.0.3", ready=False, terminating=True, serving=True))],
                           node_name="n1")
    assert len(out) == 1
    s = out[0]
    assert (s.frontend_type, s.ip, s.port, s.protocol) == ("ClusterIP", "10.96.0.10", 80, "TCP")
    assert [(b.ip, b.port, b.state) for b in s.backends] == [("10.0.0.1", 8080, BACKEND_ACTIVE),
                                                             ("10.0.0.3", 8080, BACKEND_TERMINATING)]
    assert [b.ip for b in s.active_backends()] == ["10.0.0.1"]


def test_named_target_ports_resolved_by_the_slice_and_several_ports():
    service = svc(ports=[{"name": "http", "port": 80, "targetPort": "web"},
                         {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}])
    slice_ = eps(endpoint("10.0.0.1"), ports=[{"name": "http", "port": 8080, "protocol": "TCP"},
                                              {"name": "dns", "port": 5353, "protocol": "UDP"}])
    out = {(s.port, s.protocol): s for s in desired_services([service], [slice_], node_name="n1")}
    assert out[(80, "TCP")].backends[0].port == 8080
    assert out[(53, "UDP")].backends[0].port == 5353 and out[(53, "UDP")].backends[0].protocol == "UDP"


def test_slices_are_merged_and_matched_by_label():
    out = desired_services([svc(), svc("other", clusterIP="10.96.0.11")],
                           [eps(endpoint("10.0.0.1"), name="a"), eps(endpoint("10.0.0.2"), name="b"),
                            eps(endpoint("10.0.0.9"), service="nothere", name="c")], node_name="n1")
    web = [s for s in out if s.name == "web"][0]
    assert [b.ip for b in web.backends] == ["10.0.0.1", "10.0.0.2"]
    assert [s for s in out if s.name == "other"][0].backends == ()
    # two services claiming one clusterIP: the first by namespace/name keeps it
    clash = desired_services([svc(), svc("aaa")], [], node_name="n1")
    assert [s.name for s in clash] == ["aaa"]


def test_no_endpoints_gives_a_frontend_without_backends():
    out = desired_services([svc()], [], node_name="n1")
    assert len(out) == 1 and out[0].backends == ()


def test_headless_and_externalname_have_no_frontend():
    assert desired_services([svc(clusterIP="None"), svc("x", type="ExternalName", clusterIP="")], [],
                            node_name="n1") == []


def test_session_affinity_timeout():
    out = desired_services([svc(sessionAffinity="ClientIP")], [eps(endpoint("10.0.0.1"))], node_name="n1")
    assert out[0].session_affinity and out[0].affinity_timeout == 10800
    out = desired_services([svc(sessionAffinity="ClientIP",
                                sessionAffinityConfig={"clientIP": {"timeoutSeconds": 30}})], [], node_name="n1")
    assert out[0].affinity_timeout == 30
    with pytest.raises(ValidationError, match="timeoutSeconds"):
        desired_services([svc(sessionAffinity="ClientIP",
                              sessionAffinityConfig={"clientIP": {"timeoutSeconds": 100000}})], [], node_name="n1")


def test_nodeport_and_traffic_policies():
    service = svc(type="NodePort", externalTrafficPolicy="Local", internalTrafficPolicy="Local",
                  ports=[{"name": "http", "port": 80, "nodePort": 30080}])
    slices = [eps(endpoint("10.0.0.1", node="n1"), endpoint("10.0.0.2", node="n2"))]
    n1 = desired_services([service], slices, node_name="n1", node_ips=["172.18.0.2"])
    by_type = {s.frontend_type: s for s in n1}
    assert (by_type["NodePort"].ip, by_type["NodePort"].port) == ("172.18.0.2", 30080)
    assert [b.ip for b in by_type["NodePort"].backends] == ["10.0.0.1"]
    assert [b.ip for b in by_type["ClusterIP"].backends] == ["10.0.0.1"]
    n3 = {s.frontend_type: s for s in desired_services([service], slices, node_name="n3", node_ips=["172.18.0.4"])}
    assert n3["NodePort"].backends == () and n3["ClusterIP"].backends == ()
    cluster = svc(type="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080}])
    n3 = {s.frontend_type: s for s in desired_services([cluster], slices, node_name="n3", node_ips=["172.18.0.4"])}
    assert len(n3["NodePort"].backends) == 2 and len(n3["ClusterIP"].backends) == 2


def test_external_ips_and_publish_not_ready():
    service = svc(externalIPs=["192.0.2.10"], publishNotReadyAddresses=True)
    out = desired_services([service], [eps(endpoint("10.0.0.1", ready=False))], node_name="n1")
    assert {s.frontend_type for s in out} == {"ClusterIP", "ExternalIP"}
    assert all(s.backends[0].state == BACKEND_ACTIVE for s in out)


def test_bad_address_names_the_field():
    with pytest.raises(ValidationError) as info:
        desired_services([svc(clusterIP="10.96.0.300")], [], node_name="n1")
    assert "clusterIP" in info.value.field


def test_maglev_table_is_full_even_and_stable():
    assert is_prime(251) and not is_prime(250)
    names = [f"10.0.0.{i}:80/TCP" for i in range(1, 5)]
    table = maglev_table(names, 251)
    assert len(table) == 251 and set(table) == {0, 1, 2, 3}
    counts = Counter(table)
    assert max(counts.values()) - min(counts.values()) <= 2
    assert maglev_table(names, 251) == table
    # removing one backend moves only the slots it had (consistent hashing)
    smaller = maglev_table(names[:3], 251)
    moved = sum(1 for a, b in zip(table, smaller) if a != 3 and a != b)
    assert moved < 251 // 5
    with pytest.raises(ValidationError):
        maglev_table(names, 250)
