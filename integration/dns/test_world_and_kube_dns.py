"""The sandbox's world and cluster DNS with real packets: pods resolve through kube-dns (a pod behind its
ClusterIP, forwarding to the world's authoritative DNS) and reach world hosts through their node's masquerade;
`sandbox probe FROM NAME` does exactly that and reports the addresses; `down` leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from propolis_sandbox import cluster, netns
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.resources import documents_from
from propolis_sandbox.world import WORLD_ZONE

pytestmark = pytest.mark.root
NS = "dns-test"


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=2, services="all") as state:
        docs = documents_from(NS, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}] + [
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
             "spec": {"nodeName": node["name"], "containers": [{"name": "c", "image": "echo",
                                                                 "ports": [{"containerPort": 8080}]}]}}
            for name, node in (("client", state.nodes[0]), ("web", state.nodes[1]))] + [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NS},
             "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}])
        asyncio.run(cluster.apply_documents(state, docs))
        asyncio.run(cluster.wait_running(state, 2, namespace=NS))
        asyncio.run(cluster.wait_running(state, 1, namespace="kube-system", timeout=60))
        yield state


def probe(state, target: str, *extra: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "propolis.cli.main", "sandbox", "probe", "--name",
                           state.config["name"], f"{NS}/client", target, "-o", "json", *extra],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, (json.loads(proc.stdout) if proc.stdout.strip() else {"stderr": proc.stderr})


def test_pod_resolver_is_kube_dns_with_cluster_search(sandbox):
    cfg = sandbox.sandbox()
    conf = (netns.resolv_conf_dir(cfg.pod_netns(NS, "client")) / "resolv.conf").read_text()
    assert f"nameserver {cfg.cluster_dns_ip}" in conf and f"search {NS}.svc.cluster.local svc.cluster.local" in conf


def test_world_names_resolve_through_kube_dns_and_answer(sandbox):
    code, out = probe(sandbox, "s3.amazonaws.com")
    assert code == 0 and out["answeredBy"] == "world", out
    assert sorted(out["addresses"]) == sorted(WORLD_ZONE["s3.amazonaws.com."].addresses)
    code, out = probe(sandbox, "api.stripe.com", "--port", "443")
    assert code == 0 and out["ip"] in WORLD_ZONE["api.stripe.com."].addresses, out


def test_cluster_names_short_and_long(sandbox):
    web_ip = asyncio.run(cluster.get(sandbox, "service", f"{NS}/web"))["spec"]["clusterIP"]
    for name in ("web", f"web.{NS}", f"web.{NS}.svc.cluster.local"):  # the search list makes `web` work
        code, out = probe(sandbox, name)
        assert code == 0 and out["addresses"] == [web_ip] and out["answeredBy"] == f"{NS}/web", (name, out)


def test_rotating_name_changes_between_answers(sandbox):
    seen = {probe(sandbox, "rotating.example.net")[1]["ip"] for _ in range(3)}
    assert len(seen) == 3 and seen <= set(WORLD_ZONE["rotating.example.net."].addresses), seen


def test_unknown_names_are_nxdomain(sandbox):
    code, out = probe(sandbox, "nowhere.example.com")
    assert code == 1 and "NXDOMAIN" in out["stderr"], out
    code, out = probe(sandbox, f"nothing.{NS}.svc.cluster.local")
    assert code == 1 and "NXDOMAIN" in out["stderr"], out


def test_world_host_by_address_tcp_and_udp_through_masquerade(sandbox):
    assert probe(sandbox, "world:203.0.113.10")[1]["connected"]
    assert probe(sandbox, "world:203.0.113.10", "--protocol", "UDP", "--port", "8080")[1]["answeredBy"] == "world"
    rules = subprocess.run(["ip", "netns", "exec", sandbox.sandbox().node_netns(1), "iptables", "-t", "nat", "-L",
                            "PROPOLIS-MASQ", "-v", "-n", "-x"], capture_output=True, text=True, check=True).stdout
    masq = next(line for line in rules.splitlines() if "MASQUERADE" in line)
    assert int(masq.split()[0]) > 0, rules  # the world only ever saw the node's address


def test_down_removes_world_and_resolver_files():
    with running_sandbox(nodes=1, services="none") as state:
        cfg = state.sandbox()
        assert netns.netns_exists(cfg.world_netns)
    assert not netns.netns_exists(cfg.world_netns)
    assert not list(Path("/etc/netns").glob(f"pp-{cfg.name}-*"))
