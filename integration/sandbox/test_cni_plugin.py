"""CNI plugin conformance with real namespaces: ADD, CHECK, DEL, DEL again; fail closed; the announcement.

The plugin is executed as a runtime executes it (env vars, config on stdin,
inside the node namespace); pods then reach each other with real packets
(echo servers, probes) — no API server involved.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from propolis.cni.plugin import host_ifname
from propolis_sandbox import netns, probe

pytestmark = pytest.mark.root
PLUGIN = str(Path(sys.executable).parent / "propolis-cni")


class Node:
    """A node namespace plus pod namespaces, all removed at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.netns = f"ppt-cni-{self.tag}"
        self.pods: list[str] = []
        self.ipam_dir = tmp_path / "ipam"
        netns.create_netns(self.netns)
        netns.write_sysctl(self.netns, "net.ipv4.ip_forward", "1")

    def pod(self, name: str) -> str:
        ns = f"ppt-cni-{self.tag}-{name}"
        netns.create_netns(ns)
        self.pods.append(ns)
        return ns

    def conf(self, **extra: Any) -> dict[str, Any]:
        return {"cniVersion": "1.0.0", "name": f"propolis-test-{self.tag}", "type": "propolis-cni",
                "node": "test-worker",
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.199.1.0/24"}]],
                         "dataDir": str(self.ipam_dir)}, **extra}

    def cni(self, command: str, container_id: str, pod_ns: str, conf: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        env = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_CONTAINERID": container_id,
               "CNI_NETNS": f"/run/netns/{pod_ns}", "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni",
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod_ns}"}
        proc = subprocess.run(["ip", "netns", "exec", self.netns, PLUGIN], input=json.dumps(conf),
                              capture_output=True, text=True, env=env)
        return proc.returncode, (json.loads(proc.stdout) if proc.stdout.strip() else {})

    def links(self) -> list[str]:
        with netns.iproute_in(self.netns) as ipr:
            return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]

    def cleanup(self) -> None:
        netns.terminate(netns.pids_in_netns(self.pods + [self.netns]))
        for ns in self.pods + [self.netns]:
            netns.delete_netns(ns)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    try:
        yield n
    finally:
        n.cleanup()


def test_add_check_del_del(node: Node) -> None:
    pod = node.pod("a")
    code, result = node.cni("ADD", "cid-a", pod, node.conf())
    assert code == 0, result
    assert result["cniVersion"] == "1.0.0"
    ip = result["ips"][0]["address"]
    assert ip.startswith("10.199.1.") and ip.endswith("/32")
    assert host_ifname("cid-a") in node.links()
    with netns.iproute_in(pod) as ipr:
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        assert [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=eth0, family=socket.AF_INET)] == [ip.split("/")[0]]
    code, out = node.cni("CHECK", "cid-a", pod, node.conf(prevResult=result))
    assert code == 0, out
    assert node.cni("DEL", "cid-a", pod, node.conf()) == (0, {})
    assert host_ifname("cid-a") not in node.links()
    assert node.cni("DEL", "cid-a", pod, node.conf()) == (0, {})  # idempotent
    code, err = node.cni("CHECK", "cid-a", pod, node.conf(prevResult=result))
    assert code != 0 and err["code"] == 100 and "missing" in err["msg"]


def test_errors_are_cni_error_json(node: Node) -> None:
    pod = node.pod("b")
    code, err = node.cni("ADD", "cid-b", pod, {"cniVersion": "9.9.9", "name": "x", "ipam": {"type": "host-local"}})
    assert code != 0 and err["code"] == 1 and "9.9.9" in err["msg"]
    code, err = node.cni("ADD", "cid-b", pod, {"cniVersion": "1.0.0", "name": "x"})
    assert code != 0 and err["code"] == 7
    code, out = node.cni("VERSION", "", pod, {})
    assert code == 0 and "1.0.0" in out["supportedVersions"]


def test_add_fails_closed_when_datapath_does_not_answer(node: Node, tmp_path: Path) -> None:
    pod = node.pod("c")
    code, err = node.cni("ADD", "cid-c", pod, node.conf(datapathSocket=str(tmp_path / "nobody.sock")))
    assert code != 0 and err["code"] == 11 and "did not answer" in err["msg"]
    assert host_ifname("cid-c") not in node.links()  # rolled back
    with netns.iproute_in(pod) as ipr:
        assert not ipr.link_lookup(ifname="eth0")
    assert not [f for f in node.ipam_dir.rglob("10.199.*")]  # address released


def test_add_announces_endpoint(node: Node, tmp_path: Path) -> None:
    path = str(tmp_path / "datapath.sock")
    received: list[dict[str, Any]] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)

    def answer() -> None:
        for _ in range(2):
            conn, _ = server.accept()
            with conn, conn.makefile("rwb") as f:
                received.append(json.loads(f.readline()))
                f.write(b'{"ok": true}\n')
                f.flush()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        pod = node.pod("d")
        code, result = node.cni("ADD", "cid-d", pod, node.conf(datapathSocket=path))
        assert code == 0, result
        assert node.cni("DEL", "cid-d", pod, node.conf(datapathSocket=path))[0] == 0
        thread.join(5)
    finally:
        server.close()
    add, delete = received
    assert add["op"] == "EndpointAdd" and delete["op"] == "EndpointDelete"
    assert add["containerID"] == "cid-d" and add["podName"] == pod and add["podNamespace"] == "default"
    assert add["hostIfname"] == host_ifname("cid-d") and add["hostIfindex"] > 0
    assert add["ipv4"] == result["ips"][0]["address"].split("/")[0] and add["mac"] and add["node"] == "test-worker"
    assert delete["ipv4"] == add["ipv4"] and delete["hostIfname"] == add["hostIfname"]


def test_pods_on_one_node_reach_each_other(node: Node) -> None:
    pods = [node.pod("e"), node.pod("f")]
    ips = []
    for i, pod in enumerate(pods):
        code, result = node.cni("ADD", f"cid-{i}", pod, node.conf())
        assert code == 0, result
        ips.append(result["ips"][0]["address"].split("/")[0])
    servers = [subprocess.Popen(["ip", "netns", "exec", pod, sys.executable, "-m", "propolis_sandbox.echo",
                                 "--pod", f"default/{pod}", "--tcp", "80", "--udp", "53"], stdout=subprocess.PIPE)
               for pod in pods]
    try:
        for server in servers:
            assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
        specs = [probe.ProbeSpec(pods[0], ips[1], 80, "TCP"), probe.ProbeSpec(pods[1], ips[0], 53, "UDP"),
                 probe.ProbeSpec(pods[0], ips[1], 81, "TCP")]
        results = asyncio.run(probe.probe_all(specs, timeout=1.0))
        assert [r.connected for r in results] == [True, True, False]
        assert results[0].answered_by == f"default/{pods[1]}" and results[1].answered_by == f"default/{pods[0]}"
    finally:
        for server in servers:
            server.terminate()
            server.wait()
