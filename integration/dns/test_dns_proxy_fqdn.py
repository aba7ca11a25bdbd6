"""The dns-proxy with the seed's `allow-aws-egress` (allow-aws-egress.yaml, verbatim): real DNS, real connections.

The api pod's DNS to kube-dns is redirected to its node's dns-proxy (UDP, `bpf/lib/proxy.h`), which
forwards it and, before the answer reaches the pod, has the node's datapath-writer allow the
addresses of names a toFQDNs selector matches: `s3.amazonaws.com` and `api.stripe.com` connect on the
first try, `example.org` resolves (the DNS rule allows `*`) but its connection is dropped. A narrower
DNS rule gets REFUSED for other names. A killed dns-proxy drops redirected DNS while it is away (fail
closed), connections to learned addresses keep working, and the restarted one restores its cache.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from propolis.bus import subjects
from propolis_sandbox import cluster
from propolis_sandbox import netns as netns_mod
from propolis_sandbox.config import load_state
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.resources import documents_from
from propolis_sandbox.world import WORLD_ZONE

pytestmark = pytest.mark.root
NS = "production"
POLICY = Path(__file__).with_name("allow-aws-egress.yaml")
KUBE_DNS = "10.96.0.10"
NARROW = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
          "metadata": {"name": "stripe-dns-only", "namespace": NS},
          "spec": {"endpointSelector": {"matchLabels": {"app": "narrow"}}, "egress": [
              {"toFQDNs": [{"matchName": "api.stripe.com"}]},
              {"toEndpoints": [{"matchLabels": {"io.kubernetes.pod.namespace": "kube-system",
                                                "k8s-app": "kube-dns"}}],
               "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}, {"port": "53", "protocol": "TCP"}],
                            "rules": {"dns": [{"matchName": "api.stripe.com"}]}}]}]}}


def _addresses(name: str) -> list[str]:
    return sorted(WORLD_ZONE[name + "."].addresses)


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=2, services="all") as state:
        docs = documents_from(NS, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}] + [
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
             "spec": {"nodeName": node["name"], "containers": [{"name": "c", "image": "echo",
                                                                 "ports": [{"containerPort": 8080}]}]}}
            for name, node in (("api", state.nodes[1]), ("narrow", state.nodes[1]))])
        asyncio.run(cluster.apply_documents(state, docs))
        asyncio.run(cluster.wait_running(state, 2, namespace=NS))
        asyncio.run(cluster.wait_running(state, 1, namespace="kube-system", timeout=60))
        subprocess.run([sys.executable, "-m", "propolis.cli.main", "sandbox", "apply", "--name",
                        state.config["name"], "-f", str(POLICY)], check=True, capture_output=True, timeout=60)
        asyncio.run(cluster.apply_documents(state, documents_from(NS, [NARROW])))
        asyncio.run(cluster.wait(state, timeout=60))
        yield state


def probe(state, source: str, target: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "propolis.cli.main", "sandbox", "probe", "--name",
                           state.config["name"], f"{NS}/{source}", target, "--port", "443", "--timeout", "1",
                           "-o", "json"], capture_output=True, text=True, timeout=60)
    return json.loads(proc.stdout) if proc.stdout.strip() else {"connected": False, "stderr": proc.stderr}


def query(state, pod: str, name: str, timeout: float = 1.0, tcp: bool = False) -> dns.message.Message | None:
    """One query from the pod to kube-dns (UDP as its resolver sends it, or TCP); None = no answer."""
    q = dns.message.make_query(name, "A")
    try:
        with netns_mod.entered(state.sandbox().pod_netns(NS, pod)):
            return (dns.query.tcp if tcp else dns.query.udp)(q, KUBE_DNS, timeout=timeout)
    except (dns.exception.Timeout, OSError, EOFError):
        return None


def _proxy_status(state) -> dict:
    """The api node's dns-proxy counters (from its heartbeat), to say why a probe failed."""
    async def read() -> dict:
        bus = state.admin_bus("test-dns-proxy")
        await bus.connect()
        try:
            items = await (await bus.kv(subjects.HEARTBEATS_BUCKET)).items(f"dns-proxy.{state.nodes[1]['name']}.*")
        finally:
            await bus.close()
        return {k: e.value.progress.get("dns_proxy") for k, e in items.items() if e.value is not None}
    return asyncio.run(read())


def test_allowed_names_connect_on_the_first_try_and_others_are_dropped(sandbox):
    for name in ("s3.amazonaws.com", "api.stripe.com"):
        out = probe(sandbox, "api", name)
        assert out["connected"], (out, _proxy_status(sandbox))  # the answer was released only once its addresses were allowed
        assert sorted(out["addresses"]) == _addresses(name), out
    out = probe(sandbox, "api", "example.org")
    assert not out["connected"] and out["addresses"] == _addresses("example.org"), out
    proc = subprocess.run([sys.executable, "-m", "propolis.cli.main", "policy", "selectors", "--name",
                           sandbox.config["name"], "-o", "json"], capture_output=True, text=True, timeout=60)
    selections = json.loads(proc.stdout)
    assert selections["MatchName: api.stripe.com, MatchPattern: "] == _addresses("api.stripe.com")
    assert selections["MatchName: , MatchPattern: *.amazonaws.com"] == _addresses("s3.amazonaws.com")


def test_a_name_the_dns_rules_do_not_allow_is_refused(sandbox):
    for tcp in (False, True):  # TCP 53 is redirected to the same proxy port (its TCP listener)
        answer = query(sandbox, "narrow", "example.org", tcp=tcp)
        assert answer is not None and answer.rcode() == dns.rcode.REFUSED, (tcp, answer)
        answer = query(sandbox, "narrow", "api.stripe.com", tcp=tcp)
        assert answer is not None and answer.rcode() == dns.rcode.NOERROR, (tcp, answer)
    assert probe(sandbox, "narrow", "api.stripe.com.")["connected"]  # absolute: its search names would be refused
    assert not probe(sandbox, "narrow", f"world:{_addresses('s3.amazonaws.com')[0]}")["connected"]


def test_queries_and_answers_are_hubble_dns_flows(sandbox):
    assert probe(sandbox, "api", "api.stripe.com.")["connected"]
    proc = subprocess.run([sys.executable, "-m", "propolis.cli.main", "observe", "--name", sandbox.config["name"],
                           "--protocol", "dns", "--pod", f"{NS}/api", "--last", "200", "-o", "jsonpb"],
                          capture_output=True, text=True, timeout=60)
    flows = [json.loads(line)["flow"] for line in proc.stdout.splitlines() if line.strip()]
    stripe = [f for f in flows if f["l7"]["dns"]["query"] == "api.stripe.com."]
    assert {f["l7"]["type"] for f in stripe} == {"REQUEST", "RESPONSE"}, (proc.stderr, flows[-4:])
    answer = next(f for f in stripe if f["l7"]["type"] == "RESPONSE")
    assert sorted(answer["l7"]["dns"]["ips"]) == _addresses("api.stripe.com")
    assert answer["l7"]["dns"]["observation_source"] == "proxy" and answer["destination"]["pod_name"] == "api"


def test_flows_to_learned_addresses_carry_their_names(sandbox):
    out = probe(sandbox, "api", "s3.amazonaws.com.")
    assert out["connected"], out
    proc = subprocess.run([sys.executable, "-m", "propolis.cli.main", "observe", "--name", sandbox.config["name"],
                           "--to-fqdn", "*.amazonaws.com", "--to-port", "443", "--last", "50", "-o", "jsonpb"],
                          capture_output=True, text=True, timeout=60)
    flows = [json.loads(line)["flow"] for line in proc.stdout.splitlines() if line.strip()]
    assert flows and all(f["destination_names"] == ["s3.amazonaws.com"] for f in flows), (proc.stderr, flows[-2:])
    assert out["ip"] in {f["IP"]["destination"] for f in flows}


def _dns_proxy(state, node: str) -> int:
    return next(s["pid"] for s in load_state(state.config["name"]).services
                if s["name"] == "dns-proxy" and s["node"] == node)


def _udp_listener(node_netns: str, port: int) -> int | None:
    """The pid of the process bound to UDP `port` in the node, None if nothing is."""
    out = subprocess.run(["ip", "netns", "exec", node_netns, "ss", "-Hlunp", f"sport = :{port}"],
                         capture_output=True, text=True, check=True).stdout
    found = re.search(r"pid=(\d+)", out)
    return int(found.group(1)) if found else None


def test_killed_dns_proxy_fails_closed_and_the_restarted_one_keeps_what_was_learned(sandbox):
    from propolis.fqdn.policy import DNS_PROXY_PORT
    node = sandbox.nodes[1]
    s3 = probe(sandbox, "api", "s3.amazonaws.com")
    assert s3["connected"], s3
    learned = s3["addresses"][0]
    pid = _dns_proxy(sandbox, node["name"])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while _udp_listener(node["netns"], DNS_PROXY_PORT) == pid and time.monotonic() < deadline:
        time.sleep(0.01)  # its sockets close as it exits
    outage: list[dns.message.Message | None] = []
    while _udp_listener(node["netns"], DNS_PROXY_PORT) is None and time.monotonic() < deadline:
        outage.append(query(sandbox, "api", "s3.amazonaws.com", timeout=0.3))
        assert probe(sandbox, "api", f"world:{learned}")["connected"]  # learned addresses keep working
    assert outage and all(a is None for a in outage), outage  # dropped, never forwarded unfiltered
    deadline = time.monotonic() + 30
    while query(sandbox, "api", "s3.amazonaws.com") is None and time.monotonic() < deadline:
        pass
    for name in ("s3.amazonaws.com", "api.stripe.com"):
        assert probe(sandbox, "api", name)["connected"], name
    assert not probe(sandbox, "api", "example.org")["connected"]
