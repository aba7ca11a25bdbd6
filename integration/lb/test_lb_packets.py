"""Service load-balancing with real packets between namespaces: ClusterIP TCP/UDP over many
connections, stickiness, scale-down, session affinity, NodePort from another node with
externalTrafficPolicy Cluster and Local, internalTrafficPolicy Local, no-backend drops,
hairpin, and deletion cleaning the maps."""

from __future__ import annotations

from collections import Counter

import pytest
from lb_topology import Cluster, Connection, ask_tcp, ask_udp

from propolis.lb import Backend, LBService
from propolis.maps import lb as lbmaps

pytestmark = pytest.mark.root

VIP = "10.97.0.10"


def svc(*backends: Backend, ip: str = VIP, port: int = 80, protocol: str = "TCP", ftype: str = "ClusterIP",
        affinity: int = 0) -> LBService:
    return LBService("default", "web", "http", ftype, ip, port, protocol, tuple(backends),
                     session_affinity=affinity > 0, affinity_timeout=affinity)


def backends(c: Cluster, *names: str, port: int = 8080, protocol: str = "TCP",
             terminating: tuple[str, ...] = ()) -> list[Backend]:
    return [Backend(c.pod(n).ip, port, protocol, "terminating" if n in terminating else "active",
                    "n1" if n in c.node1.pods else "n2") for n in names]


def program(c: Cluster, services: list[LBService]) -> None:
    assert c.node1.dp is not None
    c.node1.dp.set_services(services)


def test_clusterip_tcp_and_udp_reach_every_backend(cluster):
    c = cluster
    a = c.pod("a")
    program(c, [svc(*backends(c, "b", "c", "d")),
                svc(*backends(c, "b", "c", "d", port=5353, protocol="UDP"), port=53, protocol="UDP")])
    tcp = Counter(ask_tcp(a.netns, VIP, 80) for _ in range(90))
    assert set(tcp) == {"b", "c", "d"}, tcp
    assert min(tcp.values()) >= 10, tcp  # roughly even (expected 30 each)
    udp = Counter(ask_udp(a.netns, VIP, 53) for _ in range(60))
    assert set(udp) == {"b", "c", "d"}, udp


def test_a_connection_stays_on_its_backend_and_scale_down_keeps_others(cluster):
    c = cluster
    a = c.pod("a")
    program(c, [svc(*backends(c, "b", "c"))])
    conns: dict[str, Connection] = {}
    try:
        for _ in range(40):
            conn = Connection(a.netns, VIP, 80)
            name = conn.ask()
            assert name in ("b", "c")
            if name in conns:
                conn.close()
            else:
                conns[name] = conn
            if len(conns) == 2:
                break
        assert set(conns) == {"b", "c"}
        for _ in range(10):
            assert conns["b"].ask() == "b" and conns["c"].ask() == "c"
        # scale down: c goes away for new connections (terminating), b's flow is untouched
        program(c, [svc(*backends(c, "b", "c", terminating=("c",)))])
        assert {ask_tcp(a.netns, VIP, 80) for _ in range(20)} == {"b"}
        assert conns["b"].ask() == "b"
        assert conns["c"].ask() == "c"  # terminating: established flows keep working
        program(c, [svc(*backends(c, "b"))])
        assert conns["b"].ask() == "b"
    finally:
        for conn in conns.values():
            conn.close()


def test_session_affinity_holds(cluster):
    c = cluster
    program(c, [svc(*backends(c, "b", "c", "d"), affinity=300)])
    seen = {ask_tcp(c.pod("a").netns, VIP, 80) for _ in range(25)}
    assert len(seen) == 1 and None not in seen


def test_internal_traffic_policy_local(cluster):
    from propolis.bus.messages import K8sObject
    from propolis.lb import desired_services

    c = cluster
    service = K8sObject(kind="Service", namespace="default", name="web", uid="u", resource_version="1",
                        fields={"clusterIP": VIP, "internalTrafficPolicy": "Local",
                              "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]})
    slice_ = K8sObject(kind="EndpointSlice", namespace="default", name="web-1", uid="s", resource_version="1",
                       labels={"kubernetes.io/service-name": "web"},
                       fields={"addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                             "endpoints": [{"addresses": [c.pod(n).ip], "conditions": {"ready": True},
                                            "nodeName": node} for n, node in (("b", "n1"), ("d", "n2"))]})
    program(c, desired_services([service], [slice_], node_name="n1", node_ips=[c.node1_ip]))
    assert {ask_tcp(c.pod("a").netns, VIP, 80) for _ in range(20)} == {"b"}


def test_nodeport_from_another_node(cluster):
    c = cluster
    # externalTrafficPolicy: Cluster -> local and remote backends (remote ones SNATed)
    program(c, [svc(*backends(c, "b", "d"), ip=c.node1_ip, port=30080, ftype="NodePort")])
    seen = Counter(ask_tcp(c.node2.netns, c.node1_ip, 30080) for _ in range(40))
    assert set(seen) == {"b", "d"}, seen
    # externalTrafficPolicy: Local -> the node's own backends only
    program(c, [svc(*backends(c, "b"), ip=c.node1_ip, port=30080, ftype="NodePort")])
    assert {ask_tcp(c.node2.netns, c.node1_ip, 30080) for _ in range(10)} == {"b"}
    # and a pod of another node (through its own node's routing) reaches it too
    assert ask_tcp(c.pod("e").netns, c.node1_ip, 30080) == "b"


def test_no_backends_drops_with_reason(cluster):
    c = cluster
    program(c, [svc()])
    assert c.node1.dp is not None
    before = sum(r.packets for r in c.node1.dp.metrics() if r.reason == 158)
    assert ask_tcp(c.pod("a").netns, VIP, 80, timeout=0.3) is None
    assert sum(r.packets for r in c.node1.dp.metrics() if r.reason == 158) > before


def test_hairpin(cluster):
    c = cluster
    program(c, [svc(*backends(c, "a"))])
    assert ask_tcp(c.pod("a").netns, VIP, 80) == "a"
    conn = Connection(c.pod("a").netns, VIP, 80)
    try:
        assert [conn.ask() for _ in range(5)] == ["a"] * 5
    finally:
        conn.close()


def test_service_deletion_cleans_the_maps(cluster):
    c = cluster
    dp = c.node1.dp
    assert dp is not None
    program(c, [svc(*backends(c, "b", "c"))])
    assert ask_tcp(c.pod("a").netns, VIP, 80) in ("b", "c")
    program(c, [])
    for spec in lbmaps.SPECS:
        assert not lbmaps.items_batch(dp._map(spec.pin_name)), spec.pin_name
    assert dp.list_services() == []
