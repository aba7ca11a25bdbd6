"""Two node namespaces joined by an underlay veth (eth0 in each), pods on both, bpf_lxc on
every pod and cil_from_netdev on node1's eth0: real packets for the service LB tests.

Why hand-wired (like integration/datapath): the LB datapath is tested alone, without the
sandbox. Every name carries a random suffix; `teardown` removes programs, pins, servers
and namespaces even when a test fails.

Layout (X = random octet): node1 eth0 172.30.X.1/24, node2 eth0 172.30.X.2/24;
node1 pods 10.251.X.0/25, node2 pods 10.251.X.128/25, each routed via the other node.
Backend servers answer with their pod name, so a client knows which backend it reached.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
from dataclasses import dataclass, field

from pyroute2.netns import create_socket

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "datapath"))
from datapath_topology import EchoServers, Node, Pod, add_pod, sh

from propolis.datapath import Datapath, IPCacheEntry


@dataclass
class Cluster:
    suffix: str
    octet: int
    node1: Node
    node2: Node
    node1_ip: str
    node2_ip: str
    servers: list[EchoServers] = field(default_factory=list)

    def pod(self, name: str) -> Pod:
        return self.node1.pods.get(name) or self.node2.pods[name]


def ask_tcp(netns: str, ip: str, port: int, timeout: float = 0.8) -> str | None:
    """New TCP connection from `netns`: the name of the backend that answered, None if dropped."""
    s = create_socket(netns, socket.AF_INET, socket.SOCK_STREAM, flags=0)
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        s.sendall(b"who")
        return s.recv(64).decode() or None
    except OSError:
        return None
    finally:
        s.close()


def ask_udp(netns: str, ip: str, port: int, timeout: float = 0.8) -> str | None:
    u = create_socket(netns, socket.AF_INET, socket.SOCK_DGRAM, flags=0)
    u.settimeout(timeout)
    try:
        u.sendto(b"who", (ip, port))
        data, peer = u.recvfrom(64)
        return data.decode() if peer[0] == ip and peer[1] == port else f"wrong peer {peer}"
    except OSError:
        return None
    finally:
        u.close()


class Connection:
    """One long-lived TCP connection: ask() over and over on the same flow."""

    def __init__(self, netns: str, ip: str, port: int) -> None:
        self.sock = create_socket(netns, socket.AF_INET, socket.SOCK_STREAM, flags=0)
        self.sock.settimeout(0.8)
        self.sock.connect((ip, port))

    def ask(self) -> str | None:
        try:
            self.sock.sendall(b"who")
            return self.sock.recv(64).decode() or None
        except OSError:
            return None

    def close(self) -> None:
        self.sock.close()


def _node(suffix: str, index: int, subnet: str) -> Node:
    node = Node(suffix, f"pplb-n{index}-{suffix}", subnet)
    sh("ip", "netns", "add", node.netns)
    for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.default.send_redirects=0", "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0"):
        sh("ip", "netns", "exec", node.netns, "sysctl", "-qw", key)
    sh("ip", "-n", node.netns, "link", "set", "lo", "up")
    return node


def build() -> Cluster:
    """Create the two nodes, pods a,b,c (node1) and d,e (node2), servers on b, c, d."""
    suffix = secrets.token_hex(3)
    octet = int(suffix[:2], 16) % 200 + 20
    n1 = _node(suffix, 1, f"10.251.{octet}")
    cluster = Cluster(suffix, octet, n1, Node(suffix, f"pplb-n2-{suffix}", f"10.251.{octet}"),
                      f"172.30.{octet}.1", f"172.30.{octet}.2")
    try:
        cluster.node2 = _node(suffix, 2, f"10.251.{octet}")
        n2 = cluster.node2
        ul1, ul2 = f"ul1{suffix}", f"ul2{suffix}"
        sh("ip", "link", "add", ul1, "netns", n1.netns, "type", "veth", "peer", "name", ul2, "netns", n2.netns)
        sh("ip", "-n", n1.netns, "link", "set", ul1, "name", "eth0")
        sh("ip", "-n", n2.netns, "link", "set", ul2, "name", "eth0")
        for node, ip in ((n1, cluster.node1_ip), (n2, cluster.node2_ip)):
            sh("ip", "-n", node.netns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", node.netns, "link", "set", "eth0", "up")
            for key in ("net.ipv4.conf.eth0.rp_filter=0", "net.ipv4.conf.eth0.send_redirects=0"):
                sh("ip", "netns", "exec", node.netns, "sysctl", "-qw", key)
        add_pod(n1, "a", 10, endpoint_id=101, identity=50001)
        add_pod(n1, "b", 20, endpoint_id=102, identity=50002)
        add_pod(n1, "c", 30, endpoint_id=103, identity=50003)
        add_pod(n2, "d", 140, endpoint_id=201, identity=50004)
        add_pod(n2, "e", 150, endpoint_id=202, identity=50005)
        sh("ip", "-n", n1.netns, "route", "add", f"10.251.{octet}.128/25", "via", cluster.node2_ip)
        sh("ip", "-n", n2.netns, "route", "add", f"10.251.{octet}.0/25", "via", cluster.node1_ip)
        for name in ("b", "c", "d"):
            cluster.servers.append(EchoServers(cluster.pod(name), tcp_ports=(8080,), udp_ports=(5353,),
                                               answer=name.encode()))
        cluster.servers.append(EchoServers(cluster.pod("a"), tcp_ports=(8080,), udp_ports=(), answer=b"a"))

        ipcache = [IPCacheEntry(p.ip, p.identity) for n in (n1, n2) for p in n.pods.values()]

        async def attach() -> None:
            for node in (n1, n2):
                assert node.dp is not None
                node.dp.set_ipcache(ipcache)
                for pod in node.pods.values():
                    await node.dp.attach_endpoint(endpoint_id=pod.endpoint_id, ip=pod.ip, identity=pod.identity,
                                                  ifname=pod.lxc, ingress_enforced=False, egress_enforced=False)
            assert n1.dp is not None
            await n1.dp.attach_netdev("eth0")
            for node in (n1, n2):
                assert node.dp is not None
                await node.dp._tc.close()

        for index, node in ((1, n1), (2, n2)):
            node.dp = Datapath(f"pplb-{index}-{suffix}", netns=node.netns)
            node.dp.load_sync()
        asyncio.run(attach())
        return cluster
    except BaseException:
        teardown(cluster)
        raise


def teardown(cluster: Cluster) -> None:
    """Programs and pins, servers, then namespaces; every step runs."""
    errors: list[BaseException] = []
    for node in (cluster.node1, cluster.node2):
        if node.dp is not None:
            try:
                asyncio.run(node.dp.remove_all())
            except BaseException as exc:  # noqa: BLE001 - keep cleaning, raise what failed at the end
                errors.append(exc)
    for servers in cluster.servers:
        servers.stop()
    for node in (cluster.node1, cluster.node2):
        for ns in [p.netns for p in node.pods.values()] + [node.netns]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    if errors:
        raise errors[0]
