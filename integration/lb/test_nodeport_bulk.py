"""Large NodePort transfers with real packets (issue 20, item 8): a 5 MB download and a 5 MB
upload through node1's NodePort, to a backend on node1 (b) and on node2 (d), from a client on
node2. TCP over veths sends GSO packets far above the 1500-byte MTU; `bpf_fib_lookup` with
`tot_len = skb->len` called them FRAG_NEEDED, so translated packets went back to the stack
and were dropped as martians: the transfer stalled after the first segments."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from datapath_topology import Pod
from lb_topology import Cluster
from pyroute2.netns import create_socket

from propolis.lb import Backend, LBService
from propolis.maps.drop import DROP_FIB_LOOKUP

pytestmark = pytest.mark.root

BULK_PORT, NODE_PORT_LOCAL, NODE_PORT_REMOTE = 9200, 30200, 30201
SIZE = 5 * 1024 * 1024
DEADLINE = 20.0  # seconds for one transfer; a stalled one never finishes


class BulkServer:
    """In a pod: `D` -> sends SIZE bytes and closes; `U` -> reads SIZE bytes, answers the count."""

    def __init__(self, pod: Pod) -> None:
        self.sock = create_socket(pod.netns, socket.AF_INET, socket.SOCK_STREAM, flags=0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((pod.ip, BULK_PORT))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.stopping = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        conn.settimeout(DEADLINE)
        with conn:
            try:
                command = conn.recv(1)
                if command == b"D":
                    conn.sendall(b"\xab" * SIZE)
                elif command == b"U":
                    got = 0
                    while got < SIZE:
                        chunk = conn.recv(1 << 16)
                        if not chunk:
                            break
                        got += len(chunk)
                    conn.sendall(str(got).encode())
            except OSError:
                return

    def stop(self) -> None:
        self.stopping.set()
        time.sleep(0.25)
        self.sock.close()


@pytest.fixture(scope="module")
def bulk(cluster: Cluster):
    servers = [BulkServer(cluster.pod("b")), BulkServer(cluster.pod("d"))]
    assert cluster.node1.dp is not None
    cluster.node1.dp.set_services([
        LBService("default", f"bulk-{name}", "tcp", "NodePort", cluster.node1_ip, port, "TCP",
                  (Backend(cluster.pod(name).ip, BULK_PORT, "TCP", "active", node),))
        for name, port, node in (("b", NODE_PORT_LOCAL, "n1"), ("d", NODE_PORT_REMOTE, "n2"))])
    try:
        yield cluster
    finally:
        for s in servers:
            s.stop()
        cluster.node1.dp.set_services([])


def _connect(c: Cluster, port: int) -> socket.socket:
    s = create_socket(c.node2.netns, socket.AF_INET, socket.SOCK_STREAM, flags=0)
    s.settimeout(DEADLINE)
    s.connect((c.node1_ip, port))
    return s


def download(c: Cluster, port: int) -> int:
    s = _connect(c, port)
    got, start = 0, time.monotonic()
    try:
        s.sendall(b"D")
        while time.monotonic() - start < DEADLINE:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            got += len(chunk)
    except OSError:
        pass
    finally:
        s.close()
    return got


def upload(c: Cluster, port: int) -> int:
    s = _connect(c, port)
    try:
        s.sendall(b"U" + b"\xcd" * SIZE)
        return int(s.recv(32) or b"0")
    except OSError:
        return -1
    finally:
        s.close()


@pytest.mark.parametrize("port", [NODE_PORT_LOCAL, NODE_PORT_REMOTE], ids=["local-backend", "remote-backend"])
def test_5mb_download_and_upload_through_nodeport(bulk, port):
    c = bulk
    assert download(c, port) == SIZE
    assert upload(c, port) == SIZE
    assert c.node1.dp is not None
    assert not [r for r in c.node1.dp.metrics() if r.reason == DROP_FIB_LOOKUP]
