"""Conntrack room under a flood (issue 20, item 6), with real packets: service entries used to
be written before policy, so a flood of connections the policy denies (to a ClusterIP, or to
a NodePort whose local backend denies them) filled the LRU conntrack map and evicted
established pod flows. Now only allowed flows get entries, and the fill of every map the
datapath fills itself is exported as cilium_bpf_map_pressure{map_name}."""

from __future__ import annotations

import socket
import time

import prometheus_client
import pytest
from lb_topology import Cluster, ask_tcp
from pyroute2.netns import create_socket

from propolis.datapath import PolicyEntry
from propolis.datapath.pressure import MapPressureCollector, map_pressure
from propolis.lb import Backend, LBService
from propolis.maps import conntrack

pytestmark = pytest.mark.root

VIP, NODE_PORT, FLOOD = "10.97.0.30", 30400, 40


@pytest.fixture(scope="module")
def services(cluster: Cluster):
    c = cluster
    b = c.pod("b")
    assert c.node1.dp is not None
    c.node1.dp.set_services([
        LBService("default", "web", "http", "ClusterIP", VIP, 80, "TCP", (Backend(b.ip, 8080, "TCP", "active", "n1"),)),
        LBService("default", "web-np", "http", "NodePort", c.node1_ip, NODE_PORT, "TCP",
                  (Backend(b.ip, 8080, "TCP", "active", "n1"),)),
    ])
    try:
        yield c
    finally:
        c.node1.dp.set_services([])


def syn_flood(netns: str, ip: str, port: int, count: int = FLOOD) -> None:
    """`count` connection attempts from distinct source ports, without waiting for answers."""
    sockets = []
    for _ in range(count):
        s = create_socket(netns, socket.AF_INET, socket.SOCK_STREAM, flags=0)
        s.setblocking(False)
        s.connect_ex((ip, port))
        sockets.append(s)
    time.sleep(0.3)
    for s in sockets:
        s.close()


def service_entries(c: Cluster, ip: str, port: int) -> int:
    assert c.node1.dp is not None
    return sum(1 for r in c.node1.dp.conntrack()
               if r.side == conntrack.CT_SERVICE and (r.dst, r.dport) == (ip, port))


def test_denied_clusterip_flows_take_no_conntrack_room(services):
    c = services
    dp, a, b = c.node1.dp, c.pod("a"), c.pod("b")
    assert dp is not None
    dp.set_enforcement(a.endpoint_id, ingress=False, egress=True)  # egress deny-all
    try:
        syn_flood(a.netns, VIP, 80)
        assert service_entries(c, VIP, 80) == 0
        dp.set_policy(a.endpoint_id, [PolicyEntry("egress", identity=b.identity, protocol=6, port=8080)])
        assert ask_tcp(a.netns, VIP, 80) == "b"
        assert service_entries(c, VIP, 80) == 1
    finally:
        dp.set_enforcement(a.endpoint_id, ingress=False, egress=False)
        dp.set_policy(a.endpoint_id, [])


def test_nodeport_flows_denied_by_the_local_backend_are_forgotten(services):
    c = services
    dp, b = c.node1.dp, c.pod("b")
    assert dp is not None
    dp.set_enforcement(b.endpoint_id, ingress=True, egress=False)  # ingress deny-all
    try:
        syn_flood(c.node2.netns, c.node1_ip, NODE_PORT)
        assert service_entries(c, c.node1_ip, NODE_PORT) == 0
    finally:
        dp.set_enforcement(b.endpoint_id, ingress=False, egress=False)
    assert ask_tcp(c.node2.netns, c.node1_ip, NODE_PORT) == "b"
    assert service_entries(c, c.node1_ip, NODE_PORT) == 1


def test_map_pressure_is_exported(services):
    c = services
    dp = c.node1.dp
    assert dp is not None
    for _ in range(5):
        assert ask_tcp(c.pod("a").netns, VIP, 80) == "b"
    pressure = map_pressure(dp)
    tcp_entries = sum(1 for r in dp.conntrack() if r.protocol == 6)
    assert pressure["cilium_ct4_global"] == pytest.approx(tcp_entries / conntrack.TCP_SPEC.max_entries)
    assert tcp_entries >= 15  # per connection: the service entry and both sides' entries
    registry = prometheus_client.CollectorRegistry()
    registry.register(MapPressureCollector(dp))
    text = prometheus_client.generate_latest(registry).decode()
    assert f'cilium_bpf_map_pressure{{map_name="cilium_ct4_global"}} {pressure["cilium_ct4_global"]}' in text
    assert 'map_name="cilium_snat_v4_external"' in text and 'map_name="cilium_ipv4_frag_datagrams"' in text
