"""NetworkPolicy and CiliumNetworkPolicy with real packets in a sandbox running the whole suite, and the
datapath-writer restarted under traffic.

One sandbox for the module. Every test deploys its own namespaces (unique names, deleted at the end) with
echo pods on both nodes, then runs a table of cases: delete the previous case's manifests and apply this
case's, `sandbox wait` until every node enforces the API's latest revision, probe in parallel (a check is
(from, to, port, protocol, expected)). All cases run even when one fails; the assertion lists every wrong
connection. Case tables run on two copies of the workload at once (`lanes`): a case costs a `sandbox wait`
(~1 s, bookmark-bound) plus the probe timeout, and two copies share both.

Workload of the table tests (short namespace names; `{ns:a}` in a manifest is the real name):
  a (team=a): a/server app=server (node 1), a/client app=client (node 1), a/other app=other (node 2)
  b (team=b): b/client app=client (node 2), b/other app=other (node 1)
Every pod answers on TCP 8080 (http), 8081 (http-alt), 8082 (http-hi), 9090 (metrics) and UDP 5353 (dns).
`node:N` as a source is node N's own namespace (the host entity for its pods, remote-node for the others).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import yaml
from policy_workload import NO, OK, Case, PodDef, Workload, ccnp, cnp, lanes, netpol, run_in_lanes, sel

from propolis.bus import subjects
from propolis.bus.messages import Heartbeat
from propolis.runtime.heartbeats import newest, read_heartbeats
from propolis_sandbox import cluster, demo
from propolis_sandbox import netns as netns_mod
from propolis_sandbox.config import load_state
from propolis_sandbox.fixture import running_sandbox

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=2, services="all") as state:
        # every datapath-writer up (compiled, socket open) before the first pod: else the kubelets back off
        asyncio.run(cluster.wait(state, timeout=60))
        yield state


def standard(sandbox, prefix: str, extra: list[PodDef] | None = None) -> Workload:
    pods = [PodDef("a/server", 1, {"app": "server"}, server=True),
            PodDef("a/client", 1, {"app": "client"}, server=True),
            PodDef("a/other", 2, {"app": "other"}, server=True),
            PodDef("b/client", 2, {"app": "client"}, server=True),
            PodDef("b/other", 1, {"app": "other"}, server=True)] + (extra or [])
    return Workload(sandbox, prefix, {"a": {"team": "a"}, "b": {"team": "b"}}, pods)


SERVER = sel(app="server")
TCP8080 = [{"port": 8080, "protocol": "TCP"}]

#: who can reach a/server on 8080 (the usual question), with the answer filled per case
SOURCES = ("a/client", "a/other", "b/client", "b/other")


def to_server(allowed: set[str], port: int = 8080, proto: str = "TCP") -> list[tuple]:
    return [(src, "a/server", port, proto, src in allowed) for src in SOURCES]


#: a server whose port names map to other numbers than on a/server: named ports resolve per pod
ALT_PORTS = (("http", 8081, "TCP"), ("web", 8080, "TCP"), ("metrics", 8082, "TCP"), ("dns", 5353, "UDP"))


async def test_networkpolicy_ingress(sandbox):
    extra = [PodDef("a/alt", 2, {"app": "server", "variant": "alt"}, server=True, ports=ALT_PORTS)]
    async with lanes(standard(sandbox, "npin", extra), standard(sandbox, "npin2", extra)) as ws:
        cluster_cidr = sandbox.config["cluster_cidr"]
        cases = [
            Case("no policy: everything connects", [],
                 to_server(set(SOURCES)) + to_server(set(SOURCES), 5353, "UDP") +
                 [("b/client", "a/other", 9090, "TCP", OK), ("a/server", "b/other", 8080, "TCP", OK)]),
            Case("default deny ingress (empty podSelector)",
                 [netpol("deny", {"podSelector": {}, "policyTypes": ["Ingress"]})],
                 to_server(set()) + to_server(set(), 5353, "UDP") +
                 [("b/client", "a/other", 8080, "TCP", NO),
                  ("a/server", "b/other", 8080, "TCP", OK),  # egress untouched, b not selected
                  ("a/client", "b/client", 8080, "TCP", OK),
                  # the pod's own node is always let in (allow-localhost), another node is not
                  ("node:1", "a/server", 8080, "TCP", OK), ("node:2", "a/server", 8080, "TCP", NO),
                  ("node:2", "a/other", 5353, "UDP", OK), ("node:1", "a/other", 8080, "TCP", NO)]),
            Case("missing ingress with policyTypes Ingress on one pod",
                 [netpol("deny-server", {"podSelector": SERVER, "policyTypes": ["Ingress"]})],
                 to_server(set()) + [("a/client", "a/other", 8080, "TCP", OK)]),
            Case("empty ingress rule allows all",
                 [netpol("allow-all", {"podSelector": SERVER, "ingress": [{}]})],
                 to_server(set(SOURCES)) + to_server(set(SOURCES), 9090)),
            Case("allow by pod label (own namespace only)",
                 [netpol("from-client", {"podSelector": SERVER, "ingress": [{"from": [{"podSelector": sel(app="client")}]}]})],
                 to_server({"a/client"}) + to_server({"a/client"}, 5353, "UDP")),
            Case("allow by namespaceSelector",
                 [netpol("from-b", {"podSelector": SERVER, "ingress": [{"from": [{"namespaceSelector": sel(team="b")}]}]})],
                 to_server({"b/client", "b/other"})),
            Case("namespaceSelector and podSelector in one peer (AND)",
                 [netpol("from-b-client", {"podSelector": SERVER, "ingress": [{"from": [
                     {"namespaceSelector": sel(team="b"), "podSelector": sel(app="client")}]}]})],
                 to_server({"b/client"})),
            Case("namespaceSelector and podSelector as two peers (OR)",
                 [netpol("from-b-or-client", {"podSelector": SERVER, "ingress": [{"from": [
                     {"namespaceSelector": sel(team="b")}, {"podSelector": sel(app="client")}]}]})],
                 to_server({"b/client", "b/other", "a/client"})),
            Case("matchExpressions (namespace NotIn, pod In)",
                 [netpol("expr", {"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["server"]}]},
                                  "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                                      {"key": "team", "operator": "NotIn", "values": ["a"]}]},
                                      "podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}}]}]})],
                 to_server({"b/client", "b/other"})),
            Case("kubernetes.io/metadata.name namespace label",
                 [netpol("by-ns-name", {"podSelector": SERVER, "ingress": [{"from": [
                     {"namespaceSelector": sel(**{"kubernetes.io/metadata.name": "{ns:b}"})}]}]})],
                 to_server({"b/client", "b/other"})),
            Case("ipBlock pod IP /32",
                 [netpol("ipblock", {"podSelector": SERVER, "ingress": [{"from": [{"ipBlock": {"cidr": "{ip:a/client}/32"}}]}]})],
                 to_server({"a/client"})),
            Case("ipBlock with except",
                 [netpol("ipblock-except", {"podSelector": SERVER, "ingress": [{"from": [{"ipBlock": {
                     "cidr": cluster_cidr, "except": ["{ip:a/other}/32", "{ip:b/other}/32"]}}]}]})],
                 to_server({"a/client", "b/client"})),
            Case("numeric port: only 8080/TCP",
                 [netpol("port", {"podSelector": SERVER, "ingress": [{"ports": TCP8080}]})],
                 to_server(set(SOURCES)) + to_server(set(), 8081) + to_server(set(), 5353, "UDP")),
            Case("named ports (http TCP, dns UDP)",
                 [netpol("named", {"podSelector": SERVER, "ingress": [{"ports": [
                     {"port": "http"}, {"port": "dns", "protocol": "UDP"}], "from": [{"podSelector": {}}]}]})],
                 to_server({"a/client", "a/other"}) + to_server({"a/client", "a/other"}, 5353, "UDP") +
                 to_server(set(), 8081) + to_server(set(), 9090) +
                 [("a/client", "a/alt", 8081, "TCP", OK), ("a/client", "a/alt", 8080, "TCP", NO),
                  ("a/client", "a/alt", 5353, "UDP", OK)]),
            Case("endPort range 8080-8081",
                 [netpol("range", {"podSelector": SERVER, "ingress": [{"ports": [
                     {"port": 8080, "endPort": 8081, "protocol": "TCP"}]}]})],
                 to_server(set(SOURCES)) + to_server(set(SOURCES), 8081) + to_server(set(), 8082) +
                 to_server(set(), 9090)),
            Case("two policies add up",
                 [netpol("p1", {"podSelector": SERVER, "ingress": [{"from": [{"podSelector": sel(app="client")}],
                                                                    "ports": TCP8080}]}),
                  netpol("p2", {"podSelector": SERVER, "ingress": [{"from": [{"namespaceSelector": sel(team="b")}],
                                                                    "ports": [{"port": 9090}]}]})],
                 to_server({"a/client"}) + to_server({"b/client", "b/other"}, 9090)),
        ]
        await run_in_lanes(ws, cases)


async def test_networkpolicy_egress(sandbox):
    extra = [PodDef("a/alt", 2, {"app": "server", "variant": "alt"}, server=True, ports=ALT_PORTS)]
    async with lanes(standard(sandbox, "npeg", extra), standard(sandbox, "npeg2", extra)) as ws:
        cases = [
            Case("default deny egress for clients",
                 [netpol("deny-egress", {"podSelector": sel(app="client"), "policyTypes": ["Egress"]})],
                 [("a/client", "a/server", 8080, "TCP", NO), ("a/client", "b/other", 5353, "UDP", NO),
                  ("a/other", "a/server", 8080, "TCP", OK),  # not selected
                  ("a/server", "a/client", 8080, "TCP", OK),  # ingress of the client untouched
                  ("b/client", "b/other", 8080, "TCP", OK)]),  # other namespace
            Case("egress to pod label and port",
                 [netpol("to-server", {"podSelector": sel(app="client"), "policyTypes": ["Egress"],
                                       "egress": [{"to": [{"podSelector": SERVER}], "ports": TCP8080}]})],
                 [("a/client", "a/server", 8080, "TCP", OK), ("a/client", "a/server", 9090, "TCP", NO),
                  ("a/client", "a/other", 8080, "TCP", NO), ("a/client", "b/other", 8080, "TCP", NO)]),
            Case("egress to namespace, UDP only",
                 [netpol("to-b-udp", {"podSelector": sel(app="client"), "policyTypes": ["Egress"],
                                      "egress": [{"to": [{"namespaceSelector": sel(team="b")}],
                                                  "ports": [{"port": 5353, "protocol": "UDP"}]}]})],
                 [("a/client", "b/other", 5353, "UDP", OK), ("a/client", "b/client", 5353, "UDP", OK),
                  ("a/client", "b/other", 8080, "TCP", NO), ("a/client", "a/server", 5353, "UDP", NO)]),
            Case("egress to a named port of the destination",
                 [netpol("to-metrics", {"podSelector": sel(app="client"), "policyTypes": ["Egress"],
                                        "egress": [{"ports": [{"port": "metrics"}]}]})],
                 [("a/client", "a/server", 9090, "TCP", OK), ("a/client", "a/server", 8080, "TCP", NO),
                  ("a/client", "a/alt", 8082, "TCP", OK), ("a/client", "a/alt", 9090, "TCP", NO),
                  ("b/client", "a/alt", 8080, "TCP", OK)]),  # b is not selected
            Case("egress ipBlock /32 with endPort",
                 [netpol("to-ip", {"podSelector": sel(app="client"), "policyTypes": ["Egress"],
                                   "egress": [{"to": [{"ipBlock": {"cidr": "{ip:a/server}/32"}}],
                                               "ports": [{"port": 8081, "endPort": 8082}]}]})],
                 [("a/client", "a/server", 8081, "TCP", OK), ("a/client", "a/server", 8082, "TCP", OK),
                  ("a/client", "a/server", 8080, "TCP", NO), ("a/client", "a/other", 8081, "TCP", NO)]),
            Case("replies pass default-deny in the other direction (conntrack), same node and across",
                 [netpol("clients", {"podSelector": {"matchExpressions": [
                     {"key": "app", "operator": "In", "values": ["client", "other"]}]},
                     "policyTypes": ["Ingress", "Egress"], "egress": [{"to": [{"podSelector": SERVER}]}]}),
                  netpol("server", {"podSelector": SERVER, "policyTypes": ["Ingress", "Egress"],
                                    "ingress": [{"from": [{"podSelector": {}}]}]})],
                 [("a/client", "a/server", 8080, "TCP", OK), ("a/client", "a/server", 5353, "UDP", OK),
                  ("a/other", "a/server", 8080, "TCP", OK), ("a/other", "a/server", 5353, "UDP", OK),
                  ("a/server", "a/client", 8080, "TCP", NO), ("a/server", "a/other", 5353, "UDP", NO),
                  ("a/client", "a/other", 8080, "TCP", NO), ("b/client", "a/server", 8080, "TCP", NO)]),
            Case("egress allowed by the client but ingress denied at the server",
                 [netpol("client-out", {"podSelector": sel(app="client"), "egress": [{}], "policyTypes": ["Egress"]}),
                  netpol("server-in", {"podSelector": SERVER, "ingress": [{"from": [{"podSelector": sel(app="other")}]}]})],
                 [("a/client", "a/server", 8080, "TCP", NO), ("a/other", "a/server", 8080, "TCP", OK),
                  ("a/client", "a/other", 8080, "TCP", OK)]),
        ]
        await run_in_lanes(ws, cases)


async def test_networkpolicy_update_and_delete_take_effect(sandbox):
    """Two independent sequences of changes, side by side on two copies of the workload."""
    v1 = [netpol("moving", {"podSelector": SERVER, "ingress": [{"from": [{"podSelector": sel(app="client")}]}]})]
    v2 = [netpol("moving", {"podSelector": SERVER, "ingress": [{"from": [{"podSelector": sel(app="other")}],
                                                                "ports": [{"port": 9090}]}]})]
    deny = [netpol("deny", {"podSelector": {}, "policyTypes": ["Ingress"]})]
    allow = [netpol("allow-b", {"podSelector": SERVER, "ingress": [{"from": [{"namespaceSelector": sel(team="b")}]}]})]

    async def replace_and_relabel_pod(w: Workload) -> list[str]:
        failures = await w.step("v1", to_server({"a/client"}), apply=v1)
        failures += await w.step("v2 replaces v1", to_server({"a/other"}, 9090) + to_server(set(), 8080), apply=v2)
        failures += await w.step("deleted", to_server(set(SOURCES)) + to_server(set(SOURCES), 9090), delete=v2)
        failures += await w.step("v1 again", to_server({"a/client"}), apply=v1)
        # a pod relabelled into the allowed set gets in (its identity changes), the policy untouched
        relabelled = w._pod(PodDef("a/other", 2, {"app": "client"}, server=True))
        failures += await w.step("a/other relabelled app=client", to_server({"a/client", "a/other"}),
                                 apply=[relabelled])
        await w.delete(v1)
        return failures

    async def deny_allow_and_relabel_namespace(w: Workload) -> list[str]:
        # a default deny, then an allow added beside it, then the deny alone again, then nothing
        failures = await w.step("deny", to_server(set()), apply=deny)
        failures += await w.step("deny+allow", to_server({"b/client", "b/other"}), apply=allow)
        failures += await w.step("deny again", to_server(set()), delete=allow)
        failures += await w.step("nothing", to_server(set(SOURCES)), delete=deny)
        # a namespace relabelled out of a namespaceSelector loses access (every identity in it changes)
        failures += await w.step("only namespace team=b allowed", to_server({"b/client", "b/other"}), apply=allow)
        failures += await w.step("namespace b relabelled team=x", to_server(set()), apply=[
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "{ns:b}", "labels": {"team": "x"}}}])
        await w.delete(allow)
        return failures

    async with lanes(standard(sandbox, "npupd"), standard(sandbox, "npupd2")) as (w1, w2):
        results = await asyncio.gather(replace_and_relabel_pod(w1), deny_allow_and_relabel_namespace(w2))
        failures = results[0] + results[1]
        assert not failures, "\n" + "\n".join(failures)


async def test_pods_added_and_replaced_under_policy(sandbox):
    """Pods created while policies are in force: a new server is denied from its first probe, a new client
    gets in; a client replaced by a pod with other labels (on the same node, likely reusing its IP) must not
    keep the old pod's access."""
    async with standard(sandbox, "churn") as w:
        policy = [netpol("from-client", {"podSelector": SERVER,
                                         "ingress": [{"from": [{"podSelector": sel(app="client")}]}]}),
                  netpol("deny-all", {"podSelector": {}, "policyTypes": ["Ingress"]}, ns="b")]
        failures = await w.step("policy", to_server({"a/client"}), apply=policy)
        late = [PodDef("a/late-client", 2, {"app": "client"}, server=True),
                PodDef("a/late-server", 1, {"app": "server"}, server=True),
                PodDef("b/late", 1, {"app": "late"}, server=True)]
        await w.add_pods(late)
        # running with an IP, not yet `sandbox wait`ed: whatever is not settled yet must fail closed
        failures += await w.verify("new pods, first probes", [
            ("a/other", "a/late-server", 8080, "TCP", NO), ("a/client", "b/late", 8080, "TCP", NO)])
        await cluster.wait(sandbox, timeout=60)
        failures += await w.verify("new pods", [
            ("a/late-client", "a/server", 8080, "TCP", OK), ("a/client", "a/late-server", 8080, "TCP", OK),
            ("a/late-client", "a/late-server", 8080, "TCP", OK), ("a/other", "a/late-server", 8080, "TCP", NO),
            ("b/other", "a/late-server", 8080, "TCP", NO), ("a/client", "b/late", 8080, "TCP", NO),
            ("b/late", "a/other", 8080, "TCP", OK)])
        old_ip = w.ip("a/client")
        await w.delete_pods(["a/client"])
        new_ip, = await w.add_pods([PodDef("a/newcomer", 1, {"app": "other"}, server=True)])
        failures += await w.verify("replacement, first probes", [("a/newcomer", "a/server", 8080, "TCP", NO)])
        await cluster.wait(sandbox, timeout=60)
        print(f"a/client had {old_ip}, a/newcomer got {new_ip}")
        failures += await w.verify(f"a/client ({old_ip}) replaced by a/newcomer app=other ({new_ip})", [
            ("a/newcomer", "a/server", 8080, "TCP", NO), ("a/newcomer", "a/late-server", 8080, "TCP", NO),
            ("a/late-client", "a/server", 8080, "TCP", OK), ("a/server", "a/newcomer", 8080, "TCP", OK)])
        await w.delete(policy)
        assert not failures, "\n" + "\n".join(failures)


async def test_ciliumnetworkpolicy(sandbox):
    extra = [PodDef("b/server", 2, {"app": "server"}, server=True)]
    async with lanes(standard(sandbox, "cnp", extra), standard(sandbox, "cnp2", extra)) as ws:
        def b_server(allowed: set[str], port: int = 8080, proto: str = "TCP") -> list[tuple]:
            return [(src, "b/server", port, proto, src in allowed) for src in SOURCES]

        cases = [
            Case("fromEndpoints: own namespace implied",
                 [cnp("from-client", {"endpointSelector": SERVER, "ingress": [{"fromEndpoints": [sel(app="client")]}]})],
                 to_server({"a/client"}) + b_server(set(SOURCES))),
            Case("fromEndpoints cross-namespace with k8s:io.kubernetes.pod.namespace",
                 [cnp("from-b-client", {"endpointSelector": SERVER, "ingress": [{"fromEndpoints": [
                     sel(**{"app": "client", "k8s:io.kubernetes.pod.namespace": "{ns:b}"})]}]})],
                 to_server({"b/client"})),
            Case("fromEndpoints by namespace label key alone: still own namespace (as in Cilium)",
                 [cnp("from-team-b", {"endpointSelector": SERVER, "ingress": [{"fromEndpoints": [
                     sel(**{"k8s:io.cilium.k8s.namespace.labels.team": "b"})]}]})],
                 to_server(set())),
            Case("fromEndpoints by namespace label key, any namespace (namespace key Exists)",
                 [cnp("from-team-b-any", {"endpointSelector": SERVER, "ingress": [{"fromEndpoints": [
                     {"matchLabels": {"k8s:io.cilium.k8s.namespace.labels.team": "b"},
                      "matchExpressions": [{"key": "k8s:io.kubernetes.pod.namespace", "operator": "Exists"}]}]}]})],
                 to_server({"b/client", "b/other"})),
            Case("fromEndpoints empty selector = own namespace",
                 [cnp("from-ns", {"endpointSelector": SERVER, "ingress": [{"fromEndpoints": [{}]}]})],
                 to_server({"a/client", "a/other"})),
            Case("fromEntities host: only the own node",
                 [cnp("from-host", {"endpointSelector": SERVER, "ingress": [{"fromEntities": ["host"]}]})],
                 [("node:1", "a/server", 8080, "TCP", OK), ("node:2", "a/server", 8080, "TCP", NO),
                  ("a/client", "a/server", 8080, "TCP", NO)]),
            Case("fromEntities remote-node",
                 [cnp("from-remote", {"endpointSelector": SERVER, "ingress": [{"fromEntities": ["remote-node"]}]})],
                 [("node:2", "a/server", 8080, "TCP", OK), ("node:1", "a/server", 8080, "TCP", OK),  # localhost
                  ("a/client", "a/server", 8080, "TCP", NO)]),
            Case("fromEntities cluster: pods and nodes",
                 [cnp("from-cluster", {"endpointSelector": SERVER, "ingress": [{"fromEntities": ["cluster"]}]})],
                 to_server(set(SOURCES)) + [("node:1", "a/server", 8080, "TCP", OK),
                                            ("node:2", "a/server", 8080, "TCP", OK)]),
            Case("fromEntities world: nothing inside the cluster",
                 [cnp("from-world", {"endpointSelector": SERVER, "ingress": [{"fromEntities": ["world"]}]})],
                 to_server(set()) + [("node:1", "a/server", 8080, "TCP", OK),  # allow-localhost
                                     ("node:2", "a/server", 8080, "TCP", NO)]),
            Case("ingressDeny fromEntities host beats allow-localhost",
                 [cnp("deny-host", {"endpointSelector": SERVER, "ingress": [{"fromEntities": ["all"]}],
                                    "ingressDeny": [{"fromEntities": ["host"]}]})],
                 to_server(set(SOURCES)) + [("node:1", "a/server", 8080, "TCP", NO),
                                            ("node:2", "a/server", 8080, "TCP", OK)]),
            Case("deny precedence: ingressDeny beats allow-all",
                 [cnp("allow-all", {"endpointSelector": SERVER, "ingress": [{"fromEntities": ["all"]}]}),
                  cnp("deny-client", {"endpointSelector": SERVER, "ingressDeny": [{"fromEndpoints": [sel(app="client")]}]})],
                 # the deny's peer is scoped to the policy's namespace: b/client is not denied
                 to_server({"a/other", "b/client", "b/other"}) + to_server({"a/other", "b/client", "b/other"}, 5353, "UDP")),
            Case("deny precedence on one port, across namespaces",
                 [cnp("allow-ns", {"endpointSelector": SERVER, "ingress": [{"fromEndpoints": [
                     sel(**{"k8s:io.kubernetes.pod.namespace": "{ns:b}"})]}]}),
                  cnp("deny-9090", {"endpointSelector": SERVER, "ingressDeny": [{"fromEntities": ["all"],
                                                                                 "toPorts": [{"ports": [{"port": "9090"}]}]}]})],
                 to_server({"b/client", "b/other"}) + to_server(set(), 9090)),
            Case("toPorts with UDP",
                 [cnp("udp", {"endpointSelector": SERVER, "ingress": [{"fromEndpoints": [{}], "toPorts": [
                     {"ports": [{"port": "5353", "protocol": "UDP"}]}]}]})],
                 to_server({"a/client", "a/other"}, 5353, "UDP") + to_server(set(), 8080)),
            Case("toPorts endPort with protocol ANY",
                 [cnp("range-any", {"endpointSelector": SERVER, "ingress": [{"fromEndpoints": [{}], "toPorts": [
                     {"ports": [{"port": "8081", "endPort": 8082, "protocol": "ANY"}]}]}]})],
                 to_server({"a/client", "a/other"}, 8081) + to_server({"a/client", "a/other"}, 8082) +
                 to_server(set(), 8080)),
            Case("egress toEndpoints and egressDeny",
                 [cnp("client-out", {"endpointSelector": sel(app="client"), "egress": [{"toEndpoints": [{}]}]}),
                  cnp("client-deny", {"endpointSelector": sel(app="client"), "egressDeny": [
                      {"toEndpoints": [SERVER], "toPorts": [{"ports": [{"port": "9090", "protocol": "TCP"}]}]}]})],
                 [("a/client", "a/server", 8080, "TCP", OK), ("a/client", "a/server", 9090, "TCP", NO),
                  ("a/client", "a/other", 9090, "TCP", OK), ("a/client", "b/other", 8080, "TCP", NO),
                  ("b/client", "b/other", 9090, "TCP", OK)]),
        ]
        cluster_wide = [  # reach every namespace (also the other copy's): run alone
            Case("CCNP: selects servers of every namespace, peers from any namespace",
                 [ccnp("servers", {"endpointSelector": SERVER, "ingress": [{"fromEndpoints": [sel(app="client")]}]})],
                 to_server({"a/client", "b/client"}) + b_server({"a/client", "b/client"}) +
                 [("a/server", "a/other", 8080, "TCP", OK)]),
            Case("CCNP deny beats a namespaced CNP allow",
                 [cnp("allow-all", {"endpointSelector": SERVER, "ingress": [{"fromEntities": ["all"]}]}),
                  ccnp("deny-other", {"endpointSelector": {}, "ingressDeny": [{"fromEndpoints": [
                      sel(**{"app": "other", "k8s:io.kubernetes.pod.namespace": "{ns:b}"})]}]})],
                 to_server({"a/client", "a/other", "b/client"}) + [("b/other", "b/client", 8080, "TCP", NO)]),
        ]
        await run_in_lanes(ws, cases, cluster_wide)


async def test_seed_examples_verbatim(sandbox):
    """`allow-frontend` (NetworkPolicy) and the L4 part of `api-l7-policy` (CNP) from the seed text, unchanged,
    in namespace `production` (the demo's copies; tests/test_demo_manifests.py checks they equal the seed's).
    With the CNP alone frontend -> api:8080 goes to the L7 proxy, which answers this probe's non-HTTP
    payload itself: its HTTP rules are checked request by request in integration/l7."""
    ports = (("http", 8080, "TCP"), ("metrics", 9090, "TCP"))
    pods = [PodDef("production/api", 1, {"app": "api"}, server=True, ports=ports),
            PodDef("production/frontend", 2, {"app": "frontend"}, server=True, ports=ports),
            PodDef("production/other", 1, {"app": "other"}, server=True, ports=ports)]
    checks = [("production/frontend", "production/api", 8080, "TCP", OK),
              ("production/frontend", "production/api", 9090, "TCP", NO),
              ("production/other", "production/api", 8080, "TCP", NO),
              ("production/api", "production/frontend", 8080, "TCP", OK)]
    allow_frontend, api_l7 = (yaml.safe_load(p.read_text()) for p in demo.POLICIES[:2])
    assert allow_frontend["kind"] == "NetworkPolicy" and api_l7["spec"]["ingress"][0]["toPorts"][0]["rules"]
    async with Workload(sandbox, "seed", {"production": {}}, pods, exact_names=True) as w:
        failures = await w.step("allow-frontend", checks, apply=[allow_frontend])
        l4_part = [c for c in checks if c[:3] != ("production/frontend", "production/api", 8080)]
        failures += await w.step("api-l7-policy (L4 part)", l4_part, apply=[api_l7], delete=[allow_frontend])
        await w.delete([api_l7])
        assert not failures, "\n" + "\n".join(failures)


# --- datapath-writer restart under traffic ------------------------------------------------------

async def writer_beat(state, node: str) -> Heartbeat | None:
    """The newest heartbeat of `node`'s datapath-writer (None if there is none)."""
    bus = state.admin_bus("policy-test-beats")
    await bus.connect(max_wait=5)
    try:
        return newest(await read_heartbeats(bus), "datapath-writer", node)
    finally:
        await bus.close()


def writer_pid(sandbox, node: str, beat: Heartbeat | None) -> int:
    """The running writer of `node`: state.json's pid if it is still that process, else the heartbeat's."""
    state = load_state(sandbox.config["name"])
    candidates = [s["pid"] for s in state.services if s["name"] == "datapath-writer" and s["node"] == node]
    candidates += [beat.pid] if beat else []
    for pid in candidates:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PROPOLIS_NODE_NAME={node}".encode() in env and \
                f"PROPOLIS_SANDBOX={sandbox.config['name']}".encode() in env:
            return pid
    raise AssertionError(f"no running datapath-writer for {node} among {candidates}")


class Stream:
    """A long-lived TCP connection from a pod, sending a numbered line every `period` s and checking the echo."""

    def __init__(self, netns: str, ip: str, port: int, name: str) -> None:
        self.netns, self.ip, self.port, self.name = netns, ip, port, name
        self.sent = 0
        self.errors: list[str] = []
        self.buffer = b""

    async def open(self) -> None:
        self.sock = netns_mod.socket_in(self.netns, socket.AF_INET, socket.SOCK_STREAM)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(self.sock, (self.ip, self.port)), 2)

    async def roundtrip(self, timeout: float = 2.0) -> bool:
        loop = asyncio.get_running_loop()
        self.sent += 1
        line = f"{self.name} seq {self.sent}\n".encode()
        try:
            await asyncio.wait_for(loop.sock_sendall(self.sock, line), timeout)
            deadline = loop.time() + timeout
            while b"\n" not in self.buffer:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), max(0.01, deadline - loop.time()))
                if not data:
                    raise ConnectionError("closed by the peer")
                self.buffer += data
            answer, self.buffer = self.buffer.split(b"\n", 1)
            if not answer.endswith(line.rstrip(b"\n")):
                raise ValueError(f"wrong echo {answer!r}")
            return True
        except (OSError, ValueError, TimeoutError) as exc:
            self.errors.append(f"{self.name} seq {self.sent}: {type(exc).__name__} {exc}")
            return False

    def close(self) -> None:
        self.sock.close()


async def test_writer_restart_keeps_established_and_denies(sandbox):
    """Node 1's datapath-writer (it enforces a/server's ingress) is stopped (SIGTERM), then crashed (SIGKILL),
    and restarted by the supervisor each time, while a same-node and a cross-node TCP stream to a/server keep
    echoing and a/other (node 1) and a/other2 (node 2) stay denied at every probe."""
    node = sandbox.nodes[0]["name"]
    pods = [PodDef("a/server", 1, {"app": "server"}, server=True),
            PodDef("a/client", 2, {"app": "client"}, server=True),
            PodDef("a/client1", 1, {"app": "client"}, server=True),
            PodDef("a/other", 1, {"app": "other"}, server=True),
            PodDef("a/other2", 2, {"app": "other"}, server=True)]
    policy = [cnp("server", {"endpointSelector": SERVER,
                             "ingress": [{"fromEndpoints": [sel(app="client")],
                                          "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}],
                             "ingressDeny": [{"fromEndpoints": [sel(app="other")]}]})]
    denied = [(src, "a/server", port, "TCP", NO) for src in ("a/other", "a/other2") for port in (8080, 9090)]
    denied += [("a/other", "a/server", 5353, "UDP", NO), ("a/client", "a/server", 9090, "TCP", NO)]
    allowed = [("a/client", "a/server", 8080, "TCP", OK), ("a/client1", "a/server", 8080, "TCP", OK)]
    async with Workload(sandbox, "rst", {"a": {"team": "a"}}, pods) as w:
        failures = await w.step("before", allowed + denied, apply=policy)
        assert not failures, "\n" + "\n".join(failures)
        streams = [Stream(w.netns(src), w.ip("a/server"), 8080, src) for src in ("a/client", "a/client1")]
        try:
            for s in streams:
                await s.open()
                assert await s.roundtrip(), s.errors
            for how in ("SIGTERM", "SIGKILL"):
                failures += await restart_under_traffic(sandbox, w, node, how, streams, allowed + denied)
            for s in streams:
                await s.roundtrip()
            failures += [e for s in streams for e in s.errors]
            failures += await w.verify("after both restarts", allowed + denied)
            # conntrack: a deny added later stops new connections; established ones pass without a new verdict
            deny_clients = [cnp("deny-clients", {"endpointSelector": SERVER,
                                                 "ingressDeny": [{"fromEndpoints": [sel(app="client")]}]})]
            failures += await w.step("deny added under established streams",
                                     [(src, dst, port, proto, NO) for src, dst, port, proto, _ in allowed],
                                     apply=deny_clients)
            for s in streams:
                await s.roundtrip()
            failures += [e for s in streams for e in s.errors]
            await cluster.delete_documents(sandbox, w.documents(deny_clients, "deny-clients"))
        finally:
            for s in streams:
                s.close()
        # a change made while the writer is down is enforced by the next instance
        swapped = [cnp("server", {"endpointSelector": SERVER, "ingress": [{"fromEndpoints": [sel(app="other")]}]})]
        pid = writer_pid(sandbox, node, await writer_beat(sandbox, node))
        os.kill(pid, signal.SIGKILL)
        await cluster.apply_documents(sandbox, w.documents(swapped, "while down"))
        await wait_new_writer(sandbox, node, pid)
        await cluster.wait(sandbox, timeout=60)
        failures += await w.verify("policy changed while the writer was down", [
            ("a/client", "a/server", 8080, "TCP", NO), ("a/client1", "a/server", 8080, "TCP", NO),
            ("a/other", "a/server", 8080, "TCP", OK), ("a/other2", "a/server", 9090, "TCP", OK)])
        # and it still follows policy changes: without the policy everything connects
        failures += await w.step("policy deleted after the restarts",
                                 [(src, dst, port, proto, OK) for src, dst, port, proto, _ in allowed + denied],
                                 delete=swapped)
        assert not failures, "\n" + "\n".join(failures)


async def wait_new_writer(sandbox, node: str, old_pid: int, timeout: float = 60.0) -> Heartbeat:
    """Until a datapath-writer instance other than `old_pid` reports ok with a revision for `node`."""
    deadline = time.monotonic() + timeout
    while True:
        beat = await writer_beat(sandbox, node)
        if beat is not None and beat.pid != old_pid and beat.health == "ok" and \
                beat.progress.get("k8s_resource_version"):
            return beat
        assert time.monotonic() < deadline, f"datapath-writer of {node} not back after {timeout:.0f} s: {beat}"
        await asyncio.sleep(0.1)


async def restart_under_traffic(sandbox, w: Workload, node: str, how: str, streams: list[Stream],
                                checks: list) -> list[str]:
    """Kill `node`'s writer with `how`, keep the streams echoing and the checks probed until a new instance
    enforces the latest revision (and a little longer); returns the probe failures (stream errors stay in
    the streams)."""
    stop = asyncio.Event()
    probe_failures: list[str] = []
    rounds = {"traffic": 0, "probes": 0}

    async def traffic() -> None:
        while not stop.is_set():
            await asyncio.gather(*(s.roundtrip() for s in streams))
            rounds["traffic"] += 1
            await asyncio.sleep(0.02)

    async def probing(offset: float) -> None:  # several staggered loops: a short fail-open window is seen
        await asyncio.sleep(offset)
        while not stop.is_set():
            probe_failures.extend(await w.verify(f"{how} round {rounds['probes']}", checks, timeout=0.5))
            rounds["probes"] += 1

    pid = writer_pid(sandbox, node, await writer_beat(sandbox, node))
    tasks = [asyncio.create_task(traffic())] + [asyncio.create_task(probing(i * 0.125)) for i in range(4)]
    try:
        await asyncio.sleep(0.3)
        os.kill(pid, getattr(signal, how))
        killed_at = time.monotonic()
        beat = await wait_new_writer(sandbox, node, pid)  # the supervisor restarts it
        back_at = time.monotonic()
        await cluster.wait(sandbox, timeout=60)
        await asyncio.sleep(0.5)  # the new instance's first reconcile is behind us: keep going a bit
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(f"{how}: writer pid {pid} -> {beat.pid} back in {back_at - killed_at:.2f}s; {rounds}")
    assert rounds["traffic"] > 5 and rounds["probes"] > 2, rounds
    return probe_failures


async def ipcache_keys(state) -> set[str]:
    """Keys of the ipcache bucket (`<node>.<ip>`, each node's writer publishes its endpoints)."""
    bus = state.admin_bus("policy-test-ipcache")
    await bus.connect(max_wait=5)
    try:
        return set(await (await bus.kv(subjects.IPCACHE_BUCKET)).items())
    finally:
        await bus.close()


def pinned_endpoint_ips(node_entry: dict) -> set[str]:
    """IPs in the node's pinned endpoint map (cilium_lxc), read straight from bpffs."""
    from propolis.maps import endpoints as endpoint_map
    with endpoint_map.SPEC.open(node_entry["pin_dir"]) as bpf_map:
        return {e.ip for e in endpoint_map.dump(bpf_map)}


async def test_pod_deleted_while_writer_down(sandbox):
    """A pod deleted while its node's datapath-writer is not answering (its CNI DEL gets no answer, best
    effort) leaves an endpoint the next writer instance must drop: the writer comes back, forgets the
    endpoint, and the node keeps starting pods and enforcing policy."""
    node_entry = sandbox.nodes[0]
    node = node_entry["name"]
    pods = [PodDef("a/server", 1, {"app": "server"}, server=True),
            PodDef("a/gone", 1, {"app": "client"}, server=True),
            PodDef("a/client", 2, {"app": "client"}, server=True),
            PodDef("a/other", 2, {"app": "other"}, server=True)]
    policy = [cnp("server", {"endpointSelector": SERVER, "ingress": [{"fromEndpoints": [sel(app="client")]}]})]
    async with Workload(sandbox, "wdown", {"a": {"team": "a"}}, pods) as w:
        failures = await w.step("policy", [("a/gone", "a/server", 8080, "TCP", OK),
                                           ("a/other", "a/server", 8080, "TCP", NO)], apply=policy)
        gone_ip = w.ip("a/gone")
        assert gone_ip in pinned_endpoint_ips(node_entry) and f"{node}.{gone_ip}" in await ipcache_keys(sandbox)
        pid = writer_pid(sandbox, node, await writer_beat(sandbox, node))
        os.kill(pid, signal.SIGSTOP)  # hung: the CNI DEL of a/gone times out, the kubelet tears down anyway
        try:
            await w.delete_pods(["a/gone"])
        finally:
            os.kill(pid, signal.SIGKILL)
        await wait_new_writer(sandbox, node, pid, timeout=30)
        await cluster.wait(sandbox, timeout=60)
        failures += await w.verify("after the restart", [("a/client", "a/server", 8080, "TCP", OK),
                                                         ("a/other", "a/server", 8080, "TCP", NO)])
        assert gone_ip not in pinned_endpoint_ips(node_entry), f"endpoint of deleted pod a/gone ({gone_ip}) kept"
        assert f"{node}.{gone_ip}" not in await ipcache_keys(sandbox), "ipcache entry of deleted pod a/gone kept"
        await w.add_pods([PodDef("a/new", 1, {"app": "client"}, server=True)])
        await cluster.wait(sandbox, timeout=60)
        failures += await w.verify("a pod started after the restart", [("a/new", "a/server", 8080, "TCP", OK),
                                                                       ("a/other", "a/new", 8080, "TCP", OK)])
        await w.delete(policy)
        assert not failures, "\n" + "\n".join(failures)
