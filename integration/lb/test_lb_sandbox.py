"""Service load-balancing through the whole suite: API Service/EndpointSlice -> k8s-watcher -> KV ->
datapath-writer -> LB maps -> real connections from pod namespaces of a sandbox."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import pytest

from propolis_sandbox import cluster, probe
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.resources import KINDS, documents_from

pytestmark = pytest.mark.root
NS = "lb-test"


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=2, services="all") as state:
        yield state


def manifests(state) -> list[dict]:
    n1, n2 = state.nodes[0]["name"], state.nodes[1]["name"]

    def pod(name: str, node: str, labels: dict[str, str]) -> dict:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": labels},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "echo", "ports": [
                    {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                    {"name": "dns", "containerPort": 5353, "protocol": "UDP"}]}]}}

    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
            pod("client", n1, {"role": "client"}),
            pod("web-1", n1, {"app": "web"}), pod("web-2", n2, {"app": "web"}), pod("web-3", n2, {"app": "web"}),
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NS},
             "spec": {"type": "NodePort", "externalTrafficPolicy": "Local", "selector": {"app": "web"},
                      "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                                {"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"}]}}]


async def answered(state, source_netns: str, ip: str, port: int, protocol: str, count: int) -> collections.Counter:
    specs = [probe.ProbeSpec(source_netns, ip, port, protocol) for _ in range(count)]
    results = await probe.probe_all(specs, timeout=2.0, concurrency=8)
    return collections.Counter(r.answered_by or "none" for r in results)


def service_list(node: str) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "propolis.cli.main", "service", "list", "--node", node, "-o", "json"],
                          capture_output=True, text=True, timeout=30, check=True)
    return json.loads(proc.stdout)


async def test_service_from_api_to_packets(sandbox):
    docs = documents_from("lb-test", manifests(sandbox))
    cfg = sandbox.sandbox()
    client = cfg.pod_netns(NS, "client")
    await cluster.apply_documents(sandbox, docs)
    try:
        await cluster.wait_running(sandbox, 4, namespace=NS)
        await cluster.wait(sandbox)
        async with cluster.Api(sandbox.apiserver_url) as api:
            svc = await api.get(KINDS["Service"], NS, "web")
        cluster_ip = svc["spec"]["clusterIP"]
        node_port = next(p["nodePort"] for p in svc["spec"]["ports"] if p["name"] == "http")

        # ClusterIP, TCP and UDP: every ready backend gets connections
        for port, protocol in ((80, "TCP"), (53, "UDP")):
            seen = await answered(sandbox, client, cluster_ip, port, protocol, 45)
            assert set(seen) == {f"{NS}/web-1", f"{NS}/web-2", f"{NS}/web-3"}, (protocol, seen)

        # NodePort with externalTrafficPolicy Local, from node 1 to node 2: only node 2's backends
        seen = await answered(sandbox, cfg.node_netns(1), sandbox.nodes[1]["internal_ip"], node_port, "TCP", 20)
        assert set(seen) == {f"{NS}/web-2", f"{NS}/web-3"}, seen

        # the Service's cluster DNS name works as a probe target (resolved by the client through kube-dns);
        # a name nobody serves does not resolve
        def cli_probe(target: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "propolis.cli.main", "sandbox", "probe", "--name",
                                   sandbox.config["name"], f"{NS}/client", target, "--port", "80"],
                                  capture_output=True, text=True, timeout=30)
        by_name = cli_probe(f"web.{NS}.svc.cluster.local")
        assert by_name.returncode == 0 and cluster_ip in by_name.stdout, by_name.stdout + by_name.stderr
        refused = cli_probe("nowhere.example.com")
        assert refused.returncode != 0 and "NXDOMAIN" in refused.stderr, refused.stderr

        # scale down: a deleted backend gets no new connections
        async with cluster.Api(sandbox.apiserver_url) as api:
            await api.request("DELETE", KINDS["Pod"].path(NS, "web-3"))
        await cluster.wait(sandbox)
        seen = await answered(sandbox, client, cluster_ip, 80, "TCP", 30)
        assert set(seen) == {f"{NS}/web-1", f"{NS}/web-2"}, seen

        # deleting the Service removes its frontends from every node's maps
        frontends = {s["frontend"] for s in service_list(sandbox.nodes[0]["name"])}
        assert f"{cluster_ip}:80" in frontends
        async with cluster.Api(sandbox.apiserver_url) as api:
            await api.request("DELETE", KINDS["Service"].path(NS, "web"))
        await cluster.wait(sandbox)
        for node in sandbox.nodes:
            assert not [s for s in service_list(node["name"]) if s["frontend"].startswith(cluster_ip + ":")]
        seen = await answered(sandbox, client, cluster_ip, 80, "TCP", 2)
        assert seen == {"none": 2}
    finally:
        await cluster.delete_documents(sandbox, docs)
