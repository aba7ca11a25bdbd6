"""Kubernetes upstream NetworkPolicy e2e scenarios (test/e2e/network/netpol) as reachability truth tables.

Pods a, b, c in namespaces x, y, z (labels pod=<p>, ns=<n>), each serving TCP/UDP 80 and 81 with named
ports serve-<port>-<proto>. A connection src -> dst is allowed when src's egress AND dst's ingress allow it.
Each case lists the *denied* (src, dst) pairs for one protocol/port; everything else must be allowed.
"""

import itertools

import pytest

from propolis.model import identity as idm
from propolis.policy.engine import PolicyEngine

NAMESPACES, PODS = ("x", "y", "z"), ("a", "b", "c")
ALL = [f"{n}/{p}" for n in NAMESPACES for p in PODS]
IDS = {name: 1000 + i for i, name in enumerate(ALL)}
TCP, UDP = 6, 17


def _identities():
    out = {}
    for name, number in IDS.items():
        ns, p = name.split("/")
        out[number] = idm.pod_security_labels(pod_labels={"pod": p}, namespace=ns, namespace_labels={"ns": ns},
                                              cluster="default").strings()
    return out


NAMED = {number: {f"serve-{port}-{proto.lower()}": (proto, port) for port in (80, 81) for proto in ("TCP", "UDP")}
         for number in IDS.values()}


def np_(spec, name="p", ns="x"):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns},
            "spec": spec}


IPS = {number: [f"10.244.{i // 3}.{10 + i % 3}"] for i, number in enumerate(IDS.values())}  # x/* in 10.244.0.0/24 …


def denied(policies, protocol=TCP, port=80):
    e = PolicyEngine()
    e.update(policies=policies, identities=_identities(), named_ports=NAMED, endpoint_ips=IPS)
    assert not e.errors
    out = set()
    for src, dst in itertools.product(ALL, ALL):
        s, d = IDS[src], IDS[dst]
        if not (e.compile_endpoint(s).allows("egress", d, protocol, port)
                and e.compile_endpoint(d).allows("ingress", s, protocol, port)):
            out.add((src, dst))
    return out


def into(dst, allowed_from=()):
    return {(src, dst) for src in ALL if src not in allowed_from}


def out_of(src, allowed_to=()):
    return {(src, dst) for dst in ALL if dst not in allowed_to}


POD_A = {"matchLabels": {"pod": "a"}}
NOT_X = {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]}
FROM_Y_Z = [p for p in ALL if not p.startswith("x/")]

CASES = [
    ("no policies", [], TCP, 80, set()),
    ("default-deny-ingress", [np_({"podSelector": {}, "policyTypes": ["Ingress"]})], TCP, 80,
     into("x/a") | into("x/b") | into("x/c")),
    ("default-deny-all", [np_({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})], TCP, 80,
     into("x/a") | into("x/b") | into("x/c") | out_of("x/a") | out_of("x/b") | out_of("x/c")),
    ("allow-all", [np_({"podSelector": {}, "ingress": [{}]})], TCP, 80, set()),
    ("allow from pods within server namespace based on PodSelector",
     [np_({"podSelector": POD_A, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]})], TCP, 80,
     into("x/a", ["x/b"])),
    ("allow ingress from a namespace by NamespaceSelector",
     [np_({"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]})],
     TCP, 80, into("x/a", ["y/a", "y/b", "y/c"])),
    ("NamespaceSelector using the default kubernetes.io/metadata.name label",
     [np_({"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {
         "kubernetes.io/metadata.name": "z"}}}]}]})], TCP, 80, into("x/a", ["z/a", "z/b", "z/c"])),
    ("NamespaceSelector with MatchExpressions",
     [np_({"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": NOT_X}]}]})], TCP, 80,
     into("x/a", FROM_Y_Z)),
    ("PodSelector OR NamespaceSelector",
     [np_({"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": NOT_X},
                                                      {"podSelector": {"matchLabels": {"pod": "b"}}}]}]})],
     TCP, 80, into("x/a", FROM_Y_Z + ["x/b"])),
    ("PodSelector AND NamespaceSelector",
     [np_({"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": NOT_X,
                                                       "podSelector": {"matchLabels": {"pod": "b"}}}]}]})],
     TCP, 80, into("x/a", ["y/b", "z/b"])),
    ("multiple stacked policies with overlapping podSelectors", [
        np_({"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}, "p1"),
        np_({"podSelector": POD_A, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}, "p2")],
     TCP, 80, into("x/a", FROM_Y_Z)),
    ("ingress on one named port: 80 allowed",
     [np_({"podSelector": POD_A, "ingress": [{"ports": [{"port": "serve-80-tcp"}]}]})], TCP, 80, set()),
    ("ingress on one named port: 81 denied",
     [np_({"podSelector": POD_A, "ingress": [{"ports": [{"port": "serve-80-tcp"}]}]})], TCP, 81, into("x/a")),
    ("egress on one named port: 80 allowed",
     [np_({"podSelector": POD_A, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "serve-80-tcp"}]}]})],
     TCP, 80, set()),
    ("egress on one named port: 81 denied",
     [np_({"podSelector": POD_A, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "serve-80-tcp"}]}]})],
     TCP, 81, out_of("x/a")),
    ("named UDP port with protocol UDP: UDP allowed",
     [np_({"podSelector": POD_A, "policyTypes": ["Egress"], "egress": [{"ports": [
         {"port": "serve-80-udp", "protocol": "UDP"}]}]})], UDP, 80, set()),
    ("named UDP port with defaulted protocol TCP matches nothing",
     [np_({"podSelector": POD_A, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "serve-80-udp"}]}]})],
     UDP, 80, out_of("x/a")),
    ("egress to a pod in another namespace by PodSelector AND NamespaceSelector",
     [np_({"podSelector": POD_A, "policyTypes": ["Egress"], "egress": [{"to": [
         {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": POD_A}]}]})],
     TCP, 80, out_of("x/a", ["y/a"])),
    ("any port on a specific protocol: TCP 81 allowed",
     [np_({"podSelector": POD_A, "ingress": [{"ports": [{"protocol": "TCP"}]}]})], TCP, 81, set()),
    ("any port on a specific protocol: UDP 80 denied",
     [np_({"podSelector": POD_A, "ingress": [{"ports": [{"protocol": "TCP"}]}]})], UDP, 80, into("x/a")),
    ("policy with only UDP does not allow TCP",
     [np_({"podSelector": POD_A, "ingress": [{"ports": [{"port": 81, "protocol": "UDP"}]}]})], TCP, 81, into("x/a")),
    ("endPort range includes 81",
     [np_({"podSelector": POD_A, "ingress": [{"ports": [{"port": 80, "endPort": 81}]}]})], TCP, 81, set()),
    ("endPort range 79-80 excludes 81",
     [np_({"podSelector": POD_A, "ingress": [{"ports": [{"port": 79, "endPort": 80}]}]})], TCP, 81, into("x/a")),
    ("egress deny-all on the client wins over an allow-all server",
     [np_({"podSelector": POD_A, "policyTypes": ["Egress"]}),
      np_({"podSelector": {}, "ingress": [{}]}, "allow", ns="y")], TCP, 80, out_of("x/a")),
    ("ingress and egress controlled independently", [
        np_({"podSelector": POD_A, "policyTypes": ["Egress"], "egress": []}, "deny-egress"),
        np_({"podSelector": POD_A, "ingress": [{"from": [{"podSelector": {}}]}]}, "allow-ns")],
     TCP, 80, out_of("x/a") | into("x/a", ["x/b", "x/c"])),
    ("egress to a server in a CIDR block (pod IP /32)",
     [np_({"podSelector": POD_A, "policyTypes": ["Egress"], "egress": [{"to": [
         {"ipBlock": {"cidr": IPS[IDS["y/b"]][0] + "/32"}}]}]})], TCP, 80, out_of("x/a", ["y/b"])),
    ("except clause in a CIDR block holds pods out",
     [np_({"podSelector": POD_A, "policyTypes": ["Egress"], "egress": [{"to": [
         {"ipBlock": {"cidr": "10.244.0.0/16", "except": [IPS[IDS["y/b"]][0] + "/32", "10.244.2.0/24"]}}]}]})],
     TCP, 80, {("x/a", "y/b"), ("x/a", "z/a"), ("x/a", "z/b"), ("x/a", "z/c")}),
    ("ingress from a CIDR block of one namespace's pods",
     [np_({"podSelector": POD_A, "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.1.0/24"}}]}]})],
     TCP, 80, into("x/a", ["y/a", "y/b", "y/c"])),
    ("policy in namespace y only affects y",
     [np_({"podSelector": {}, "policyTypes": ["Ingress"]}, ns="y")], TCP, 80,
     into("y/a") | into("y/b") | into("y/c")),
]


@pytest.mark.parametrize("name, policies, protocol, port, expected", CASES, ids=[c[0] for c in CASES])
def test_upstream_truth_table(name, policies, protocol, port, expected):
    assert denied(policies, protocol, port) == expected
