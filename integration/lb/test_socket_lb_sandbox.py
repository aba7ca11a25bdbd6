"""Socket LB (issue 19, Cilium's socketLB with hostNamespaceOnly) through the whole suite: each node's
datapath-writer attaches bpf_sock.c to the node's own cgroup; a process of the node (its cgroup and its
network namespace) reaches ClusterIP and NodePort Services with real connections, spread over the
backends; a UDP reply comes from the Service's address; its own hostPort answers; a process in the same
namespace but outside the node's cgroup (the test machine's root cgroup) is not translated; pods keep the
per-packet path.

Never from the machine's root namespace: a ClusterIP there would be routed out of the machine."""

from __future__ import annotations

import asyncio
import collections
import socket
import subprocess
import sys

import pytest

from propolis.runtime.heartbeats import newest, read_heartbeats
from propolis.runtime.netns import socket_in
from propolis.writer.socket_lb import ENABLED_STATE
from propolis_sandbox import cgroups, cluster, probe
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.resources import KINDS, documents_from

pytestmark = pytest.mark.root
NS = "socklb-test"
WEB = {f"{NS}/web-1", f"{NS}/web-2", f"{NS}/web-3"}
HOST_PORT = 18081


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=2, services="all") as state:
        yield state


def manifests(state) -> list[dict]:
    n1, n2 = state.nodes[0]["name"], state.nodes[1]["name"]

    def pod(name: str, node: str, labels: dict[str, str], host_port: int = 0) -> dict:
        http = {"name": "http", "containerPort": 8080, "protocol": "TCP", **({"hostPort": host_port} if host_port else {})}
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": labels},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "echo", "ports": [
                    http, {"name": "dns", "containerPort": 5353, "protocol": "UDP"}]}]}}

    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
            pod("client", n1, {"role": "client"}),
            pod("web-1", n1, {"app": "web"}, HOST_PORT), pod("web-2", n2, {"app": "web"}), pod("web-3", n2, {"app": "web"}),
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NS},
             "spec": {"type": "NodePort", "selector": {"app": "web"},
                      "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                                {"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"}]}}]


async def answered(netns: str, ip: str, port: int, count: int, *, cgroup: str = "") -> collections.Counter:
    specs = [probe.ProbeSpec(netns, ip, port, "TCP", from_cgroup=cgroup) for _ in range(count)]
    results = await probe.probe_all(specs, timeout=2.0, concurrency=4)
    return collections.Counter(r.answered_by or (r.error or "none") for r in results)


def udp_exchange(netns: str, cgroup: str, ip: str, port: int) -> tuple[str, tuple[str, int]]:
    """One datagram to ip:port from an unconnected socket of the node; (answer, the reply's source)."""
    with cgroups.joined(cgroup):
        sock = socket_in(netns, socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.setblocking(True)
        sock.settimeout(2.0)
        sock.sendto(probe.PROBE_PAYLOAD, (ip, port))
        data, source = sock.recvfrom(4096)
    return data.decode().split(" ", 1)[0].strip(), source


async def writer_feature(state, node: str) -> dict:
    bus = state.admin_bus("socklb-test-beats")
    await bus.connect(max_wait=5)
    try:
        hb = newest(await read_heartbeats(bus), "datapath-writer", node)
    finally:
        await bus.close()
    return (hb.features.get("Socket LB") or {}) if hb else {}


async def test_node_processes_reach_services_through_socket_lb(sandbox):
    cfg = sandbox.sandbox()
    n1 = sandbox.nodes[0]
    node_ns, node_cg = n1["netns"], n1["cgroup"]
    assert node_cg == str(cgroups.node_cgroup(cfg.name, n1["name"]))
    docs = documents_from(NS, manifests(sandbox))
    await cluster.apply_documents(sandbox, docs)
    try:
        await cluster.wait_running(sandbox, 4, namespace=NS)
        await cluster.wait(sandbox)
        for node in sandbox.nodes:
            feature = await writer_feature(sandbox, node["name"])
            assert feature.get("state") == ENABLED_STATE and node["cgroup"] in feature["detail"], feature
        async with cluster.Api(sandbox.apiserver_url) as api:
            svc = await api.get(KINDS["Service"], NS, "web")
        cluster_ip = svc["spec"]["clusterIP"]
        node_port = next(p["nodePort"] for p in svc["spec"]["ports"] if p["name"] == "http")

        # ClusterIP from the node (its cgroup and namespace): every connection answered by a backend, spread
        seen = await answered(node_ns, cluster_ip, 80, 30, cgroup=node_cg)
        assert set(seen) <= WEB and sum(seen.values()) == 30 and len(seen) > 1, seen

        # UDP (sendmsg4 / recvmsg4): a backend answers, and the reply's source is the Service
        answer, source = await asyncio.to_thread(udp_exchange, node_ns, node_cg, cluster_ip, 53)
        assert answer in WEB and source == (cluster_ip, 53), (answer, source)

        # NodePort on the node's own address, from the node itself
        seen = await answered(node_ns, n1["internal_ip"], node_port, 12, cgroup=node_cg)
        assert set(seen) <= WEB and sum(seen.values()) == 12, seen

        # the node's own hostPort (Cilium: a HostPort frontend on a local address is translated at connect)
        seen = await answered(node_ns, n1["internal_ip"], HOST_PORT, 3, cgroup=node_cg)
        assert seen == {f"{NS}/web-1": 3}, seen

        # the same namespace from the test machine's root cgroup: nothing translates it (no route to a ClusterIP)
        assert cgroups.current_cgroup() != cgroups.node_cgroup(cfg.name, n1["name"])
        seen = await answered(node_ns, cluster_ip, 80, 3)
        assert seen == {"Network is unreachable": 3}, seen  # as every node without socket LB

        # `propolis status` names it
        status = subprocess.run([sys.executable, "-m", "propolis.cli.main", "status", "--name", cfg.name],
                                capture_output=True, text=True, timeout=60, check=False)
        line = next((x for x in status.stdout.splitlines() if x.startswith("Socket LB")), "")
        assert ENABLED_STATE in line, status.stdout

        # a pod (its own namespace, its workload in the node's cgroup): the per-packet path serves it as before
        seen = await answered(cfg.pod_netns(NS, "client"), cluster_ip, 80, 15, cgroup=node_cg)
        assert set(seen) <= WEB and sum(seen.values()) == 15, seen
    finally:
        await cluster.delete_documents(sandbox, docs)
