"""A node namespace with pod namespaces wired like the sandbox, for datapath tests with real packets.

Why hand-wired here: these tests check the datapath alone with real packets, without the
rest of the suite. Every name carries a random suffix so concurrent runs never collide;
teardown removes programs, pins and namespaces even when a test fails.

Layout: pods have eth0 with a /32 and a default route via 169.254.1.1 (a permanent
neighbour entry on the lxc's MAC); the node routes each pod /32 to its lxc veth.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

from pyroute2.netns import create_socket

from propolis.datapath import Datapath


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@dataclass
class Pod:
    name: str
    netns: str
    ip: str
    lxc: str
    ifindex: int = 0
    endpoint_id: int = 0
    identity: int = 0


@dataclass
class Node:
    suffix: str
    netns: str
    subnet: str
    pods: dict[str, Pod] = field(default_factory=dict)
    remotes: dict[str, Pod] = field(default_factory=dict)
    dp: Datapath | None = None
    servers: list[EchoServers] = field(default_factory=list)

    def all_netns(self) -> list[str]:
        return [self.netns] + [p.netns for p in (*self.pods.values(), *self.remotes.values())]


def add_pod(node: Node, name: str, host_octet: int, endpoint_id: int, identity: int) -> Pod:
    pod = Pod(name, f"ppdp-{name}-{node.suffix}", f"{node.subnet}.{host_octet}",
              "lxc" + secrets.token_hex(6)[:11], endpoint_id=endpoint_id, identity=identity)
    node.pods[name] = pod
    sh("ip", "netns", "add", pod.netns)
    sh("ip", "-n", node.netns, "link", "add", pod.lxc, "type", "veth", "peer", "name", "eth0", "netns", pod.netns)
    sh("ip", "-n", node.netns, "link", "set", pod.lxc, "up")
    sh("ip", "-n", pod.netns, "link", "set", "lo", "up")
    sh("ip", "-n", pod.netns, "link", "set", "eth0", "up")
    sh("ip", "-n", pod.netns, "addr", "add", f"{pod.ip}/32", "dev", "eth0")
    mac = sh("ip", "netns", "exec", node.netns, "cat", f"/sys/class/net/{pod.lxc}/address").strip()
    sh("ip", "-n", pod.netns, "neigh", "add", "169.254.1.1", "lladdr", mac, "dev", "eth0", "nud", "permanent")
    sh("ip", "-n", pod.netns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
    sh("ip", "-n", pod.netns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0", "onlink")
    sh("ip", "-n", node.netns, "route", "add", f"{pod.ip}/32", "dev", pod.lxc)
    pod.ifindex = int(sh("ip", "netns", "exec", node.netns, "cat", f"/sys/class/net/{pod.lxc}/ifindex"))
    return pod


def add_remote(node: Node, name: str, host_octet: int, identity: int, underlay_octet: int) -> Pod:
    """A pod of another node, reached through an underlay veth and plain routing (no BPF
    on its side): its packets enter local pods after routing, like cross-node traffic."""
    underlay = f"172.31.{underlay_octet}"
    pod = Pod(name, f"ppdp-{name}-{node.suffix}", f"{node.subnet}.{host_octet}",
              "ul" + secrets.token_hex(6)[:11], identity=identity)
    node.remotes[name] = pod
    sh("ip", "netns", "add", pod.netns)
    sh("ip", "-n", node.netns, "link", "add", pod.lxc, "type", "veth", "peer", "name", "eth0", "netns", pod.netns)
    sh("ip", "-n", node.netns, "addr", "add", f"{underlay}.1/30", "dev", pod.lxc)
    sh("ip", "-n", node.netns, "link", "set", pod.lxc, "up")
    sh("ip", "-n", pod.netns, "link", "set", "lo", "up")
    sh("ip", "-n", pod.netns, "addr", "add", f"{pod.ip}/32", "dev", "lo")
    sh("ip", "-n", pod.netns, "addr", "add", f"{underlay}.2/30", "dev", "eth0")
    sh("ip", "-n", pod.netns, "link", "set", "eth0", "up")
    sh("ip", "-n", pod.netns, "route", "add", "default", "via", f"{underlay}.1", "src", pod.ip)
    sh("ip", "-n", node.netns, "route", "add", f"{pod.ip}/32", "via", f"{underlay}.2")
    return pod


def teardown(node: Node) -> None:
    """Programs and pins first, then servers, then namespaces; every step runs."""
    errors: list[BaseException] = []
    if node.dp is not None:
        try:
            asyncio.run(node.dp.remove_all())
        except BaseException as exc:  # noqa: BLE001 - keep cleaning, raise what failed at the end
            errors.append(exc)
    for servers in node.servers:
        servers.stop()
    for ns in reversed(node.all_netns()):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    if errors:
        raise errors[0]


class EchoServers:
    """TCP and UDP servers inside a pod namespace (threads, sockets made in the netns).

    They echo what they receive, or answer every message with ``answer`` when given (the LB
    tests use the pod's name so a client knows which backend it reached)."""

    def __init__(self, pod: Pod, tcp_ports: tuple[int, ...], udp_ports: tuple[int, ...],
                 answer: bytes | None = None) -> None:
        self.answer = answer
        self.sockets: list[socket.socket] = []
        self.stopping = threading.Event()
        for port in tcp_ports:
            s = create_socket(pod.netns, socket.AF_INET, socket.SOCK_STREAM, flags=0)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((pod.ip, port))
            s.listen(64)
            s.settimeout(0.2)
            self.sockets.append(s)
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()
        for port in udp_ports:
            u = create_socket(pod.netns, socket.AF_INET, socket.SOCK_DGRAM, flags=0)
            u.bind((pod.ip, port))
            u.settimeout(0.2)
            self.sockets.append(u)
            threading.Thread(target=self._udp, args=(u,), daemon=True).start()

    def _accept(self, s: socket.socket) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = s.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        with conn:
            while not self.stopping.is_set():
                try:
                    data = conn.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(self.answer or data)

    def _udp(self, u: socket.socket) -> None:
        while not self.stopping.is_set():
            try:
                data, peer = u.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            u.sendto(self.answer or data, peer)

    def stop(self) -> None:
        self.stopping.set()
        time.sleep(0.25)
        for s in self.sockets:
            s.close()


def tcp_probe(pod: Pod, ip: str, port: int, timeout: float = 0.6) -> bool:
    """A new TCP connection from `pod` that echoes b'ping'; False when dropped (timeout)."""
    s = create_socket(pod.netns, socket.AF_INET, socket.SOCK_STREAM, flags=0)
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        s.sendall(b"ping")
        return s.recv(16) == b"ping"
    except (TimeoutError, ConnectionRefusedError, OSError):
        return False
    finally:
        s.close()


def udp_probe(pod: Pod, ip: str, port: int, timeout: float = 0.6) -> bool:
    u = create_socket(pod.netns, socket.AF_INET, socket.SOCK_DGRAM, flags=0)
    u.settimeout(timeout)
    try:
        u.sendto(b"ping", (ip, port))
        data, _ = u.recvfrom(16)
        return data == b"ping"
    except (TimeoutError, OSError):
        return False
    finally:
        u.close()
