"""ICMP errors about translated flows, translated back (RFC 5508; issue 20, item 7), with real
packets. The error quotes the packet as the backend saw it; the client's socket only knows the
frontend, so before this a UDP client of a Service port nobody listens on never got
ECONNREFUSED, and fragmentation-needed for a ClusterIP flow never reached the client's socket
(a path-MTU black hole: a large upload stalled); nor did one about a NodePort reply reach
its backend (large downloads through NodePort stalled behind a smaller MTU)."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
from lb_topology import Cluster
from pyroute2.netns import create_socket
from test_nodeport_bulk import BULK_PORT, DEADLINE, SIZE, BulkServer

from propolis.lb import Backend, LBService

pytestmark = pytest.mark.root

VIP = "10.97.0.20"
CLOSED_PORT = 5454           # nobody listens there on b or d
NODE_PORT = 30300
BULK_NODE_PORTS = {"b": 30301, "d": 30302}


def _service(name: str, ftype: str, ip: str, port: int, protocol: str, backend: Backend) -> LBService:
    return LBService("default", name, "p", ftype, ip, port, protocol, (backend,))


@pytest.fixture(scope="module")
def services(cluster: Cluster):
    c = cluster
    b, d = c.pod("b"), c.pod("d")
    assert c.node1.dp is not None
    c.node1.dp.set_services([
        _service("closed-local", "ClusterIP", VIP, 53, "UDP", Backend(b.ip, CLOSED_PORT, "UDP", "active", "n1")),
        _service("closed-remote", "ClusterIP", VIP, 54, "UDP", Backend(d.ip, CLOSED_PORT, "UDP", "active", "n2")),
        _service("closed-nodeport", "NodePort", c.node1_ip, NODE_PORT, "UDP",
                 Backend(b.ip, CLOSED_PORT, "UDP", "active", "n1")),
        _service("bulk-remote", "ClusterIP", VIP, 80, "TCP", Backend(d.ip, BULK_PORT, "TCP", "active", "n2")),
        *(_service(f"bulk-{name}", "NodePort", c.node1_ip, port, "TCP",
                   Backend(c.pod(name).ip, BULK_PORT, "TCP", "active", "n1" if name == "b" else "n2"))
          for name, port in BULK_NODE_PORTS.items()),
    ])
    servers = [BulkServer(b), BulkServer(d)]
    try:
        yield c
    finally:
        for server in servers:
            server.stop()
        c.node1.dp.set_services([])


def udp_refused(netns: str, ip: str, port: int) -> bool:
    """A connected UDP socket sends twice: True when the port-unreachable reached it."""
    u = create_socket(netns, socket.AF_INET, socket.SOCK_DGRAM, flags=0)
    u.settimeout(0.8)
    try:
        u.connect((ip, port))
        u.send(b"anyone?")
        u.recv(64)
        return False
    except ConnectionRefusedError:
        return True
    except (TimeoutError, OSError):
        return False
    finally:
        u.close()


@pytest.mark.parametrize("port", [53, 54], ids=["local-backend", "remote-backend"])
def test_udp_to_a_closed_service_port_is_refused(services, port):
    assert udp_refused(services.pod("a").netns, VIP, port)


def test_udp_to_a_closed_nodeport_is_refused(services):
    c = services
    assert udp_refused(c.node2.netns, c.node1_ip, NODE_PORT)


def test_path_mtu_of_a_clusterip_flow_reaches_the_client(services):
    """node1's underlay MTU drops to 1300: node1 answers the client's 1500-byte segments with
    fragmentation-needed quoting the backend; the client must learn the path MTU for the VIP."""
    c = services
    subprocess.run(["ip", "-n", c.node1.netns, "link", "set", "eth0", "mtu", "1300"], check=True)
    s = create_socket(c.pod("a").netns, socket.AF_INET, socket.SOCK_STREAM, flags=0)
    try:
        s.settimeout(15.0)
        s.connect((VIP, 80))
        start = time.monotonic()
        s.sendall(b"U" + b"\xcd" * SIZE)
        assert int(s.recv(32) or b"0") == SIZE
        assert time.monotonic() - start < 15.0
    finally:
        s.close()
        subprocess.run(["ip", "-n", c.node1.netns, "link", "set", "eth0", "mtu", "1500"], check=True)


@pytest.mark.parametrize("backend", ["b", "d"], ids=["local-backend", "remote-backend"])
def test_path_mtu_of_a_nodeport_reply_reaches_the_backend(services, backend):
    """Pod e (node2) downloads through node1's NodePort; node2's link to e has MTU 1300, so node2
    answers the backend's 1500-byte replies with fragmentation-needed quoting frontend -> e.
    node1 must hand it to the backend as about its own packet."""
    c = services
    e = c.pod("e")
    subprocess.run(["ip", "-n", c.node2.netns, "link", "set", e.lxc, "mtu", "1300"], check=True)
    s = create_socket(e.netns, socket.AF_INET, socket.SOCK_STREAM, flags=0)
    got = 0
    try:
        s.settimeout(DEADLINE)
        s.connect((c.node1_ip, BULK_NODE_PORTS[backend]))
        s.sendall(b"D")
        start = time.monotonic()
        while time.monotonic() - start < DEADLINE:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            got += len(chunk)
    except OSError:
        pass
    finally:
        s.close()
        subprocess.run(["ip", "-n", c.node2.netns, "link", "set", e.lxc, "mtu", "1500"], check=True)
    assert got == SIZE
