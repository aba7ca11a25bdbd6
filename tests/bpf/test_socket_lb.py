"""Socket LB (bpf_sock.c) on real sockets: a cgroup and a network namespace of the test's own stand
for a node; clients are real processes placed in (or out of) them.

What must hold: a TCP connect and a UDP sendto to a Service frontend from the node's cgroup *and*
namespace reach its backends, spread over them; the UDP reply and getpeername() report the frontend;
a process of the same namespace outside the cgroup, and one in the cgroup but another namespace
(a pod's: hostNamespaceOnly), are not translated; a detached program translates nothing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from propolis.datapath import Datapath
from propolis.datapath.loader import SOCK_PROGRAMS
from propolis.datapath.socket_lb import (
    SockAttachment,
    SocketLbAttacher,
    cgroup2_mount,
    host_netns_cookie,
)
from propolis.lb import Backend, LBService
from propolis.maps import bpf
from propolis.runtime.netns import socket_in
from propolis.writer.socket_lb import SocketLbTarget, desired_socket_lb

pytestmark = pytest.mark.root

VIP, PORT = "10.96.0.50", 80
BACKENDS = ("10.250.0.1", "10.250.0.2", "10.250.0.3")
BACKEND_PORT = 8080

#: a client process: N TCP connects (answer = the backend's address, and getpeername) and N UDP
#: exchanges on one socket (answer + the reply's source address); errors by errno name
CLIENT = r"""
import errno, json, socket, sys
vip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {"tcp": [], "peer": [], "udp": [], "udp_from": [], "errors": []}
for _ in range(n):
    s = socket.socket(); s.settimeout(2)
    try:
        s.connect((vip, port)); out["peer"].append(s.getpeername()[0]); out["tcp"].append(s.recv(64).decode())
    except OSError as e:
        out["errors"].append("tcp " + errno.errorcode.get(e.errno, str(e)))
    finally:
        s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(2)
for _ in range(n):
    try:
        u.sendto(b"q", (vip, port)); data, src = u.recvfrom(64)
        out["udp"].append(data.decode()); out["udp_from"].append("%s:%d" % src)
    except OSError as e:
        out["errors"].append("udp " + errno.errorcode.get(e.errno, str(e)))
print(json.dumps(out))
"""


@dataclass
class Node:
    netns: str
    cgroup: str
    dp: Datapath


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _serve(netns: str, address: str, stop: threading.Event) -> list[socket.socket]:
    """TCP and UDP on address:BACKEND_PORT answering with the address (threads until `stop`)."""
    tcp = socket_in(netns, socket.AF_INET, socket.SOCK_STREAM)
    udp = socket_in(netns, socket.AF_INET, socket.SOCK_DGRAM)
    for s in (tcp, udp):
        s.setblocking(True)
        s.settimeout(0.2)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, BACKEND_PORT))
    tcp.listen(64)

    def tcp_loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = tcp.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.sendall(address.encode())

    def udp_loop() -> None:
        while not stop.is_set():
            try:
                _, peer = udp.recvfrom(64)
            except (TimeoutError, OSError):
                continue
            udp.sendto(address.encode(), peer)

    for loop in (tcp_loop, udp_loop):
        threading.Thread(target=loop, daemon=True).start()
    return [tcp, udp]


@pytest.fixture
def node(loaded_datapath: Datapath) -> Iterator[Node]:
    """A network namespace with the backends on its loopback, a cgroup under a test root, the
    Service in the LB maps and the socket-LB programs attached; all removed afterwards."""
    tag = uuid.uuid4().hex[:8]
    netns = f"ppsk-{tag}"
    cgroup = os.path.join(cgroup2_mount(), f"propolis-test-{tag}")
    stop = threading.Event()
    socks: list[socket.socket] = []
    dp = loaded_datapath
    _ip("netns", "add", netns)
    try:
        _ip("-n", netns, "link", "set", "lo", "up")
        for address in BACKENDS:
            _ip("-n", netns, "addr", "add", f"{address}/32", "dev", "lo")
            socks += _serve(netns, address, stop)
        os.mkdir(cgroup)
        backends = tuple(Backend(a, BACKEND_PORT, proto) for a in BACKENDS for proto in ("TCP",))
        dp.set_services([
            LBService("default", "echo", "tcp", "ClusterIP", VIP, PORT, "TCP", backends),
            LBService("default", "echo", "udp", "ClusterIP", VIP, PORT, "UDP",
                      tuple(Backend(a, BACKEND_PORT, "UDP") for a in BACKENDS)),
        ])
        attacher = SocketLbAttacher(dp.pin_dir)
        attacher.write_config(host_netns_cookie(netns))
        assert dp.programs is not None
        for program, attach_type in SOCK_PROGRAMS.items():
            attacher.attach(program, dp.programs.sock_fds[program], attach_type, cgroup)
        yield Node(netns, cgroup, dp)
    finally:
        stop.set()
        for s in socks:
            s.close()
        attacher = SocketLbAttacher(dp.pin_dir)
        for program in list(attacher.attached()):
            attacher.detach(program)
        dp.set_services([])
        if os.path.isdir(cgroup):
            os.rmdir(cgroup)  # the clients have exited: empty
        subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)


def run_client(netns: str, cgroup: str | None, count: int = 12) -> dict[str, list[str]]:
    """The client in `netns`, inside `cgroup` (None: the test's own cgroup, e.g. the root)."""
    def join() -> None:
        if cgroup:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write("0")

    proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", CLIENT, VIP, str(PORT), str(count)],
                          capture_output=True, text=True, timeout=60, preexec_fn=join, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_node_cgroup_client_reaches_the_service_spread_over_backends(node: Node) -> None:
    out = run_client(node.netns, node.cgroup)
    assert out["errors"] == []
    assert len(out["tcp"]) == 12 and set(out["tcp"]) <= set(BACKENDS)
    assert len(set(out["tcp"])) > 1, Counter(out["tcp"])  # random per connection: 12 on 1 of 3 is 3^-11
    assert out["peer"] == [VIP] * 12  # getpeername4: the frontend, not the backend


def test_udp_reply_comes_from_the_service_address(node: Node) -> None:
    out = run_client(node.netns, node.cgroup, count=5)
    assert out["errors"] == []
    assert len(set(out["udp"])) == 1 and out["udp"][0] in BACKENDS  # one socket sticks to one backend
    assert out["udp_from"] == [f"{VIP}:{PORT}"] * 5  # recvmsg4


def test_outside_the_cgroup_nothing_is_translated(node: Node) -> None:
    """Same namespace, the test's own cgroup: the ClusterIP has no route there, as without socket LB."""
    out = run_client(node.netns, None, count=2)
    assert out["tcp"] == [] and out["udp"] == []
    assert all(e.endswith("ENETUNREACH") for e in out["errors"]), out["errors"]


def test_other_namespace_in_the_cgroup_is_left_alone(node: Node) -> None:
    """hostNamespaceOnly: a pod's socket (another namespace) in the node's cgroup is not translated."""
    pod = f"{node.netns}-pod"
    _ip("netns", "add", pod)
    try:
        _ip("-n", pod, "link", "set", "lo", "up")
        out = run_client(pod, node.cgroup, count=2)
    finally:
        subprocess.run(["ip", "netns", "del", pod], check=False, capture_output=True)
    assert out["tcp"] == [] and all(e.endswith("ENETUNREACH") for e in out["errors"]), out


def test_service_without_backends_refuses_at_connect(node: Node) -> None:
    node.dp.set_services([LBService("default", "empty", "tcp", "ClusterIP", VIP, PORT, "TCP", ())])
    out = run_client(node.netns, node.cgroup, count=1)
    assert out["errors"][0] == "tcp ECONNREFUSED"


def test_target_attaches_repairs_and_prunes(node: Node, loaded_datapath: Datapath) -> None:
    """The writer's reconciler target: a link detached by hand is re-made; removal detaches."""
    import asyncio

    target = SocketLbTarget(loaded_datapath)
    attacher = target.attacher
    desired = desired_socket_lb(True, node.cgroup, host_netns_cookie(node.netns))
    assert set(desired) == set(SOCK_PROGRAMS)
    fd = bpf.obj_get(attacher.link_path("cil_sock4_connect"))
    try:
        bpf.link_detach(fd)  # drift: bpftool link detach
    finally:
        os.close(fd)
    assert attacher.attached()["cil_sock4_connect"].cgroup_id == 0
    asyncio.run(target.update("cil_sock4_connect", desired["cil_sock4_connect"]))
    assert attacher.attached()["cil_sock4_connect"].cgroup_id == os.stat(node.cgroup).st_ino
    assert run_client(node.netns, node.cgroup, count=2)["errors"] == []

    asyncio.run(target.delete("cil_sock4_connect"))
    assert "cil_sock4_connect" not in asyncio.run(target.list_actual())
    out = run_client(node.netns, node.cgroup, count=1)
    assert out["tcp"] == [] and out["errors"][0] == "tcp ENETUNREACH"  # UDP is still translated (sendmsg4)
    assert out["udp_from"] == [f"{VIP}:{PORT}"]
    assert desired_socket_lb(False, node.cgroup, 1) == {}
    assert SockAttachment(node.cgroup, 1) == SockAttachment(node.cgroup, 1)
