"""NodePort SNAT to a backend on another node with real packets (issue 20, item 2): two clients
in different namespaces using the SAME source port each get only their own answers (UDP), and
both TCP connections work side by side. Keeping the client's port made them share one reply
tuple: one client got the other's datagrams, one TCP connection was reset."""

from __future__ import annotations

import socket

import pytest
from datapath_topology import EchoServers
from lb_topology import Cluster
from pyroute2.netns import create_socket

from propolis.lb import Backend, LBService

pytestmark = pytest.mark.root

NODE_PORT, BACKEND_PORT, CLIENT_PORT = 30090, 9100, 40123


@pytest.fixture(scope="module")
def remote_echo(cluster: Cluster):
    """An echo server (answers what it got) on d, a pod of node2: remote for node1's NodePort."""
    servers = EchoServers(cluster.pod("d"), tcp_ports=(BACKEND_PORT,), udp_ports=(BACKEND_PORT,))
    assert cluster.node1.dp is not None
    d = cluster.pod("d")
    cluster.node1.dp.set_services([
        LBService("default", "echo", "udp", "NodePort", cluster.node1_ip, NODE_PORT, protocol,
                  (Backend(d.ip, BACKEND_PORT, protocol, "active", "n2"),))
        for protocol in ("UDP", "TCP")])
    try:
        yield servers
    finally:
        servers.stop()
        cluster.node1.dp.set_services([])


def _clients(c: Cluster, kind: int) -> dict[str, socket.socket]:
    """Pod e (node2) and node2 itself, each bound to CLIENT_PORT."""
    out = {}
    for name, netns in (("pod-e", c.pod("e").netns), ("node2", c.node2.netns)):
        s = create_socket(netns, socket.AF_INET, kind, flags=0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.settimeout(1.0)
        s.bind(("0.0.0.0", CLIENT_PORT))
        out[name] = s
    return out


def test_same_source_port_udp_clients_each_get_their_own_answers(cluster, remote_echo):
    c = cluster
    clients = _clients(c, socket.SOCK_DGRAM)
    try:
        for round_ in range(5):
            for name, s in clients.items():
                s.sendto(f"{name}-{round_}".encode(), (c.node1_ip, NODE_PORT))
            for name, s in clients.items():
                data, peer = s.recvfrom(64)
                assert (data.decode(), peer) == (f"{name}-{round_}", (c.node1_ip, NODE_PORT))
        for s in clients.values():  # nothing of the other client's arrived on top
            s.settimeout(0.2)
            with pytest.raises(TimeoutError):
                s.recvfrom(64)
    finally:
        for s in clients.values():
            s.close()


def test_same_source_port_tcp_clients_both_work(cluster, remote_echo):
    c = cluster
    clients = _clients(c, socket.SOCK_STREAM)
    try:
        for s in clients.values():
            s.connect((c.node1_ip, NODE_PORT))
        for round_ in range(5):
            for name, s in clients.items():
                s.sendall(f"{name}-{round_}".encode())
                assert s.recv(64).decode() == f"{name}-{round_}"
    finally:
        for s in clients.values():
            s.close()
