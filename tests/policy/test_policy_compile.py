"""Compile scenarios: these policies + these identities -> this enforcement and these entries.

Rows are written as (direction, peer identity, protocol, port, end_port, deny); "I"/"E" = ingress/egress.
"""

import copy

import pytest

from propolis.bus.messages import K8sObject
from propolis.errors import ValidationError
from propolis.model import identity as idm
from propolis.policy.engine import PolicyEngine
from propolis.policy.entries import PolicyEntry, icmp_type_port
from propolis.policy.proxy_ports import PROXY_PORTS

NS_LABELS = {"production": {"env": "prod"}, "other": {"team": "a"}, "kube-system": {}}


def pod(app, ns, **extra):
    return idm.pod_security_labels(pod_labels={"app": app, **extra}, namespace=ns,
                                   namespace_labels=NS_LABELS[ns], cluster="default").strings()


API, FRONT, FRONT_OTHER, DB, ADMIN_OTHER, DNS = 300, 301, 302, 303, 304, 305
IDENTITIES = {
    API: pod("api", "production"),
    FRONT: pod("frontend", "production"),
    FRONT_OTHER: pod("frontend", "other"),
    DB: pod("db", "production", tier="data"),
    ADMIN_OTHER: pod("admin", "other"),
    DNS: idm.pod_security_labels(pod_labels={"k8s-app": "kube-dns"}, namespace="kube-system",
                                 cluster="default").strings(),
}
PODS = set(IDENTITIES)
NAMED_PORTS = {API: {"http": ["TCP", 8080]}, DB: {"pg": ["TCP", 5432]}, FRONT_OTHER: {"pg": ["TCP", 6432]}}
I, E = "ingress", "egress"
TCP, UDP, SCTP, ICMP = 6, 17, 132, 1
WORLD = {2, 9, 10}
RESERVED_CLUSTER = {1, 3, 4, 5, 6, 7, 8}


def np_(spec, name="np", ns="production"):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def cnp(spec, name="cnp", ns="production"):
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def ccnp(spec, name="ccnp"):
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
            "metadata": {"name": name}, "spec": spec}


def engine(policies, mode="default"):
    e = PolicyEngine(mode=mode, cluster_name="default")
    e.update(policies=[copy.deepcopy(p) for p in policies], identities=IDENTITIES, named_ports=NAMED_PORTS)
    assert not e.errors, e.errors
    return e


def rows(result):
    return {(e.direction, e.identity, e.protocol, e.port, e.end_port, e.deny) for e in result.entries}


def allow(direction, peers, proto=0, port=0, end=0):
    return {(direction, p, proto, port, end, False) for p in peers}


def deny(direction, peers, proto=0, port=0, end=0):
    return {(direction, p, proto, port, end, True) for p in peers}


APP_API = {"matchLabels": {"app": "api"}}


# --- Kubernetes NetworkPolicy ---------------------------------------------------------------
NP_SCENARIOS = [
    ("no policy: allow all, nothing enforced", [], API, (False, False), set()),
    ("deny all ingress in namespace", [np_({"podSelector": {}, "policyTypes": ["Ingress"]})], API, (True, False), set()),
    ("deny all ingress does not reach other namespaces",
     [np_({"podSelector": {}, "policyTypes": ["Ingress"]})], FRONT_OTHER, (False, False), set()),
    ("allow all ingress: ingress [{}]", [np_({"podSelector": {}, "ingress": [{}]})], API, (True, False), allow(I, [0])),
    ("ingress missing, policyTypes missing: still default deny ingress",
     [np_({"podSelector": APP_API})], API, (True, False), set()),
    ("egress [] present: Egress implied, ingress default deny too",
     [np_({"podSelector": APP_API, "egress": []})], API, (True, True), set()),
    ("policyTypes Egress only: ingress rules ignored",
     [np_({"podSelector": APP_API, "policyTypes": ["Egress"], "ingress": [{}], "egress": [{}]})], API,
     (False, True), allow(E, [0])),
    ("podSelector peer: same namespace only",
     [np_({"podSelector": APP_API, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}]}]})],
     API, (True, False), allow(I, [FRONT])),
    ("empty podSelector peer: every pod of the policy's namespace",
     [np_({"podSelector": APP_API, "ingress": [{"from": [{"podSelector": {}}]}]})],
     API, (True, False), allow(I, [API, FRONT, DB])),
    ("namespaceSelector peer", [np_({"podSelector": APP_API, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"team": "a"}}}]}]})], API, (True, False), allow(I, [FRONT_OTHER, ADMIN_OTHER])),
    ("namespaceSelector by kubernetes.io/metadata.name", [np_({"podSelector": APP_API, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}]}]})],
     API, (True, False), allow(I, [DNS])),
    ("empty namespaceSelector: all pods of all namespaces, no reserved identities", [np_({"podSelector": APP_API, "ingress": [
        {"from": [{"namespaceSelector": {}}]}]})], API, (True, False), allow(I, PODS)),
    ("namespaceSelector and podSelector combined (AND)", [np_({"podSelector": APP_API, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"team": "a"}}, "podSelector": {"matchLabels": {"app": "frontend"}}}]}]})],
     API, (True, False), allow(I, [FRONT_OTHER])),
    ("two peers are ORed", [np_({"podSelector": APP_API, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"team": "a"}}}, {"podSelector": {"matchLabels": {"app": "frontend"}}}]}]})],
     API, (True, False), allow(I, [FRONT, FRONT_OTHER, ADMIN_OTHER])),
    ("matchExpressions NotIn / Exists", [np_({"podSelector": APP_API, "ingress": [{"from": [{"podSelector": {
        "matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["frontend"]},
                             {"key": "tier", "operator": "Exists"}]}}]}]})], API, (True, False), allow(I, [DB])),
    ("ports: TCP default, UDP, SCTP, port-less protocol", [np_({"podSelector": APP_API, "ingress": [{"ports": [
        {"port": 80}, {"port": 53, "protocol": "UDP"}, {"port": 9, "protocol": "SCTP"}, {"protocol": "UDP"}]}]})],
     API, (True, False), allow(I, [0], TCP, 80) | allow(I, [0], UDP, 53) | allow(I, [0], SCTP, 9) | allow(I, [0], UDP, 0)),
    ("endPort range", [np_({"podSelector": APP_API, "ingress": [{"ports": [{"port": 8000, "endPort": 9000}]}]})],
     API, (True, False), allow(I, [0], TCP, 8000, 9000)),
    ("ingress named port resolves on the selected pod", [np_({"podSelector": {}, "ingress": [
        {"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}], "ports": [{"port": "http"}]}]})],
     API, (True, False), allow(I, [FRONT], TCP, 8080)),
    ("ingress named port the pod does not have: nothing allowed", [np_({"podSelector": {}, "ingress": [
        {"ports": [{"port": "http"}]}]})], DB, (True, False), set()),
    ("egress named port resolves on each destination", [np_({"podSelector": APP_API, "policyTypes": ["Egress"], "egress": [
        {"to": [{"namespaceSelector": {}}], "ports": [{"port": "pg"}]}]})],
     API, (False, True), allow(E, [DB], TCP, 5432) | allow(E, [FRONT_OTHER], TCP, 6432)),
    ("egress named port with protocol mismatch: nothing", [np_({"podSelector": APP_API, "policyTypes": ["Egress"], "egress": [
        {"to": [{"podSelector": {}}], "ports": [{"port": "pg", "protocol": "UDP"}]}]})], API, (False, True), set()),
    ("egress to all with named port: every pod that has the name", [np_({"podSelector": APP_API, "policyTypes": ["Egress"],
        "egress": [{"ports": [{"port": "pg"}]}]})], API, (False, True),
     allow(E, [DB], TCP, 5432) | allow(E, [FRONT_OTHER], TCP, 6432)),
    ("several policies add up", [
        np_({"podSelector": APP_API, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}]}]}, "a"),
        np_({"podSelector": APP_API, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "db"}}}],
                                                  "ports": [{"port": 9090}]}]}, "b")],
     API, (True, False), allow(I, [FRONT]) | allow(I, [DB], TCP, 9090)),
    ("policy of another namespace never selects", [np_({"podSelector": {}, "ingress": []}, ns="other")],
     API, (False, False), set()),
]


@pytest.mark.parametrize("name, policies, subject, enforcement, expected", NP_SCENARIOS, ids=[s[0] for s in NP_SCENARIOS])
def test_network_policy_scenarios(name, policies, subject, enforcement, expected):
    result = engine(policies).compile_endpoint(subject)
    assert (result.ingress_enforced, result.egress_enforced) == enforcement
    assert rows(result) == expected


def test_ipblock_with_except_gets_own_identities():
    e = engine([np_({"podSelector": APP_API, "ingress": [{"from": [
        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16", "10.2.0.0/16"]}}]}]})])
    cidrs = e.cidr_identities()
    assert set(cidrs) == {"10.0.0.0/8", "10.1.0.0/16", "10.2.0.0/16"}
    assert all(n >= 1 << 24 for n in cidrs.values()) and len(set(cidrs.values())) == 3
    assert rows(e.compile_endpoint(API)) == allow(I, [cidrs["10.0.0.0/8"]])


def test_ipblock_all_addresses_includes_world():
    e = engine([np_({"podSelector": APP_API, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]})])
    cidr = e.cidr_identities()["0.0.0.0/0"]
    assert rows(e.compile_endpoint(API)) == allow(E, [cidr, 2, 9])


# --- CiliumNetworkPolicy -------------------------------------------------------------------------
CNP_SCENARIOS = [
    ("fromEndpoints: own namespace implied", [cnp({"endpointSelector": APP_API, "ingress": [
        {"fromEndpoints": [{"matchLabels": {"app": "frontend"}}]}]})], API, (True, False), allow(I, [FRONT])),
    ("fromEndpoints {}: all endpoints of the namespace", [cnp({"endpointSelector": APP_API, "ingress": [
        {"fromEndpoints": [{}]}]})], API, (True, False), allow(I, [API, FRONT, DB])),
    ("fromEndpoints with k8s:io.kubernetes.pod.namespace: cross-namespace", [cnp({"endpointSelector": APP_API, "ingress": [
        {"fromEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "other", "app": "frontend"}}]}]})],
     API, (True, False), allow(I, [FRONT_OTHER])),
    ("fromEndpoints with io.kubernetes.pod.namespace (any source)", [cnp({"endpointSelector": APP_API, "ingress": [
        {"fromEndpoints": [{"matchExpressions": [{"key": "io.kubernetes.pod.namespace", "operator": "Exists"}]}]}]})],
     API, (True, False), allow(I, PODS)),
    ("namespace-label key without namespace: scoped to own namespace", [cnp({"endpointSelector": APP_API, "ingress": [
        {"fromEndpoints": [{"matchLabels": {"k8s:io.cilium.k8s.namespace.labels.env": "prod"}}]}]})],
     API, (True, False), allow(I, [API, FRONT, DB])),
    ("namespace-label key plus namespace Exists: cross-namespace", [cnp({"endpointSelector": APP_API, "ingress": [
        {"fromEndpoints": [{"matchLabels": {"k8s:io.cilium.k8s.namespace.labels.team": "a"},
                            "matchExpressions": [{"key": "k8s:io.kubernetes.pod.namespace", "operator": "Exists"}]}]}]})],
     API, (True, False), allow(I, [FRONT_OTHER, ADMIN_OTHER])),
    ("reserved selector is not namespace-scoped", [cnp({"endpointSelector": APP_API, "ingress": [
        {"fromEndpoints": [{"matchLabels": {"reserved:host": ""}}]}]})], API, (True, False), allow(I, [1])),
    ("ingress [{}]: default deny, nothing allowed", [cnp({"endpointSelector": APP_API, "ingress": [{}]})],
     API, (True, False), set()),
    ("ingress []: not a section, nothing enforced", [cnp({"endpointSelector": APP_API, "ingress": []})],
     API, (False, False), set()),
    ("toPorts without L3: every peer", [cnp({"endpointSelector": APP_API, "ingress": [
        {"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]})], API, (True, False), allow(I, [0], TCP, 80)),
    ("protocol ANY with a port: TCP, UDP and SCTP", [cnp({"endpointSelector": APP_API, "ingress": [
        {"toPorts": [{"ports": [{"port": "80"}]}]}]})], API, (True, False),
     allow(I, [0], TCP, 80) | allow(I, [0], UDP, 80) | allow(I, [0], SCTP, 80)),
    ("port 0 ANY: everything", [cnp({"endpointSelector": APP_API, "ingress": [
        {"toPorts": [{"ports": [{"port": "0"}]}]}]})], API, (True, False), allow(I, [0])),
    ("endPort range", [cnp({"endpointSelector": APP_API, "egress": [
        {"toEndpoints": [{}], "toPorts": [{"ports": [{"port": "8000", "endPort": 8100, "protocol": "TCP"}]}]}]})],
     API, (False, True), allow(E, [API, FRONT, DB], TCP, 8000, 8100)),
    ("icmps", [cnp({"endpointSelector": APP_API, "ingress": [
        {"fromEndpoints": [{"matchLabels": {"app": "frontend"}}], "icmps": [{"fields": [{"type": 8, "family": "IPv4"},
                                                                                       {"type": "EchoRequest", "family": "IPv6"}]}]}]})],
     API, (True, False), allow(I, [FRONT], ICMP, icmp_type_port(8)) | allow(I, [FRONT], 58, icmp_type_port(128))),
    ("entity world", [cnp({"endpointSelector": APP_API, "egress": [{"toEntities": ["world"]}]})],
     API, (False, True), allow(E, WORLD)),
    ("entity cluster", [cnp({"endpointSelector": APP_API, "egress": [{"toEntities": ["cluster"]}]})],
     API, (False, True), allow(E, RESERVED_CLUSTER | PODS)),
    ("entity all = wildcard identity 0", [cnp({"endpointSelector": APP_API, "egress": [{"toEntities": ["all"]}]})],
     API, (False, True), allow(E, [0])),
    ("entity host", [cnp({"endpointSelector": APP_API, "ingress": [{"fromEntities": ["host"]}]})], API, (True, False), allow(I, [1])),
    ("entity remote-node (kube-apiserver carries it)", [cnp({"endpointSelector": APP_API, "ingress": [
        {"fromEntities": ["remote-node"]}]})], API, (True, False), allow(I, [6, 7])),
    ("entities kube-apiserver, health, init, unmanaged, ingress", [cnp({"endpointSelector": APP_API, "egress": [
        {"toEntities": ["kube-apiserver", "health", "init", "unmanaged", "ingress"]}]})],
     API, (False, True), allow(E, [7, 4, 5, 3, 8])),
    ("entity world-ipv4 / world-ipv6", [cnp({"endpointSelector": APP_API, "egress": [
        {"toEntities": ["world-ipv4", "world-ipv6"]}]})], API, (False, True), allow(E, [9, 10])),
    ("entity none: enforced, nothing allowed", [cnp({"endpointSelector": APP_API, "egress": [{"toEntities": ["none"]}]})],
     API, (False, True), set()),
    ("ingressDeny alone turns on default deny", [cnp({"endpointSelector": APP_API, "ingressDeny": [
        {"fromEntities": ["world"]}]})], API, (True, False), deny(I, WORLD)),
    ("deny and allow both emitted (datapath makes deny win)", [cnp({"endpointSelector": APP_API,
        "ingress": [{"fromEndpoints": [{}]}],
        "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "frontend"}}], "toPorts": [{"ports": [{"port": "22", "protocol": "TCP"}]}]}]})],
     API, (True, False), allow(I, [API, FRONT, DB]) | deny(I, [FRONT], TCP, 22)),
    ("egressDeny port 0 (seed bandwidth-limit): deny everything", [cnp({"endpointSelector": APP_API, "egressDeny": [
        {"toPorts": [{"ports": [{"port": "0"}]}]}]})], API, (False, True), deny(E, [0])),
    ("enableDefaultDeny false: allows added, no default deny", [cnp({"endpointSelector": APP_API,
        "enableDefaultDeny": {"ingress": False}, "ingress": [{"fromEntities": ["host"]}]})],
     API, (False, False), allow(I, [1])),
    ("enableDefaultDeny false loses against another selecting policy", [
        cnp({"endpointSelector": APP_API, "enableDefaultDeny": {"ingress": False}, "ingress": [{"fromEntities": ["host"]}]}, "a"),
        cnp({"endpointSelector": {}, "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "db"}}]}]}, "b")],
     API, (True, False), allow(I, [1, DB])),
    ("fromRequires ANDed into fromEndpoints of every selecting rule", [
        cnp({"endpointSelector": {}, "ingress": [{"fromRequires": [{"matchLabels": {"tier": "data"}}]}]}, "req"),
        cnp({"endpointSelector": APP_API, "ingress": [{"fromEndpoints": [{}]}, {"fromEntities": ["host"]}]}, "allow")],
     API, (True, False), allow(I, [DB, 1])),
    ("toRequires on egress", [cnp({"endpointSelector": APP_API, "egress": [
        {"toRequires": [{"matchLabels": {"app": "frontend"}}]},
        {"toEndpoints": [{"matchExpressions": [{"key": "io.kubernetes.pod.namespace", "operator": "Exists"}]}]}]})],
     API, (False, True), allow(E, [FRONT])),
    ("egress named port on toEndpoints", [cnp({"endpointSelector": APP_API, "egress": [
        {"toEndpoints": [{"matchLabels": {"app": "db"}}], "toPorts": [{"ports": [{"port": "pg", "protocol": "TCP"}]}]}]})],
     API, (False, True), allow(E, [DB], TCP, 5432)),
    ("ingress named port on the subject", [cnp({"endpointSelector": APP_API, "ingress": [
        {"toPorts": [{"ports": [{"port": "http"}]}]}]})], API, (True, False), allow(I, [0], TCP, 8080)),
    ("toServices/toFQDNs select nothing yet but enforce", [cnp({"endpointSelector": APP_API, "egress": [
        {"toServices": [{"k8sService": {"serviceName": "s", "namespace": "production"}}]},
        {"toFQDNs": [{"matchName": "example.com"}]}]})], API, (False, True), set()),
    ("nodeSelector CCNP never selects pods", [ccnp({"nodeSelector": {}, "ingress": [{"fromEntities": ["cluster"]}]})],
     API, (False, False), set()),
]


@pytest.mark.parametrize("name, policies, subject, enforcement, expected", CNP_SCENARIOS, ids=[s[0] for s in CNP_SCENARIOS])
def test_cilium_policy_scenarios(name, policies, subject, enforcement, expected):
    result = engine(policies).compile_endpoint(subject)
    assert (result.ingress_enforced, result.egress_enforced) == enforcement
    assert rows(result) == expected


def test_ccnp_selects_across_namespaces_and_peers_need_a_namespace():
    e = engine([ccnp({"endpointSelector": {"matchLabels": {"app": "frontend"}}, "ingress": [{"fromEndpoints": [{}]}]})])
    for subject in (FRONT, FRONT_OTHER):
        result = e.compile_endpoint(subject)
        assert result.ingress_enforced and rows(result) == allow(I, PODS)  # pods only, no reserved identities
    assert not e.compile_endpoint(API).ingress_enforced


def test_world_entity_includes_cidr_identities():
    e = engine([cnp({"endpointSelector": APP_API, "egress": [{"toEntities": ["world"]}]}, "w"),
                cnp({"endpointSelector": {"matchLabels": {"app": "db"}}, "egress": [{"toCIDR": ["1.2.3.0/24"]}]}, "c")])
    cidr = e.cidr_identities()["1.2.3.0/24"]
    assert rows(e.compile_endpoint(API)) == allow(E, WORLD | {cidr})
    assert rows(e.compile_endpoint(DB)) == allow(E, [cidr])


def test_cidrset_except_hole_is_not_allowed_but_a_more_specific_allow_is():
    e = engine([cnp({"endpointSelector": APP_API, "egress": [
        {"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}]},
        {"toCIDR": ["10.1.2.0/24"], "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}]})])
    ids = e.cidr_identities()
    assert set(ids) == {"10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24"}
    assert rows(e.compile_endpoint(API)) == allow(E, [ids["10.0.0.0/8"]]) | allow(E, [ids["10.1.2.0/24"]], TCP, 443)


def test_modes_always_and_never():
    assert (lambda r: (r.ingress_enforced, r.egress_enforced, r.entries))(engine([], "always").compile_endpoint(API)) == (True, True, ())
    pol = [cnp({"endpointSelector": APP_API, "ingress": [{"fromEntities": ["host"]}]})]
    assert rows(engine(pol, "always").compile_endpoint(API)) == allow(I, [1])
    never = engine(pol, "never").compile_endpoint(API)
    assert (never.ingress_enforced, never.egress_enforced, never.entries) == (False, False, ())
    with pytest.raises(ValidationError, match="mode"):
        PolicyEngine(mode="sometimes")


# --- the seed examples, verbatim -----------------------------------------------------------------
SEED_ALLOW_FRONTEND = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-frontend
  namespace: production
spec:
  podSelector:
    matchLabels:
      app: api
  ingress:
  - from:
    - podSelector:
        matchLabels:
          app: frontend
    ports:
    - port: 8080
      protocol: TCP
"""

SEED_API_L7 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: api-l7-policy
  namespace: production
spec:
  endpointSelector:
    matchLabels:
      app: api
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: frontend
    toPorts:
    - ports:
      - port: "8080"
        protocol: TCP
      rules:
        http:
        - method: GET
          path: "/api/v1/users"
        - method: GET
          path: "/api/v1/health"
        - method: POST
          path: "/api/v1/users"
"""

SEED_AWS_EGRESS = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: allow-aws-egress
  namespace: production
spec:
  endpointSelector:
    matchLabels:
      app: api
  egress:
  - toFQDNs:
    - matchPattern: "*.amazonaws.com"
    - matchName: "api.stripe.com"
  - toEndpoints:
    - matchLabels:
        io.kubernetes.pod.namespace: kube-system
        k8s-app: kube-dns
    toPorts:
    - ports:
      - port: "53"
        protocol: UDP
      rules:
        dns:
        - matchPattern: "*"
"""

SEED_BANDWIDTH = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: bandwidth-limit
spec:
  endpointSelector:
    matchLabels:
      app: data-processor
  egressDeny:
  - toPorts:
    - ports:
      - port: "0"
"""

SEED_HOST_FIREWALL = """
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata:
  name: host-firewall
spec:
  nodeSelector:
    matchLabels:
      node-role.kubernetes.io/worker: ""
  ingress:
  - fromEntities:
    - cluster
    toPorts:
    - ports:
      - port: "10250"
        protocol: TCP
  - fromCIDR:
    - "10.0.0.0/8"
    toPorts:
    - ports:
      - port: "22"
        protocol: TCP
"""

SEED_KAFKA_TOPORTS = """
toPorts:
- ports:
  - port: "9092"
    protocol: TCP
  rules:
    kafka:
    - role: consume
      topic: "user-events"
    - role: consume
      topic: "order-events"
"""


def _yaml(text):
    import yaml
    return yaml.safe_load(text)


def test_seed_allow_frontend():
    e = engine([_yaml(SEED_ALLOW_FRONTEND)])
    api = e.compile_endpoint(API)
    assert (api.ingress_enforced, api.egress_enforced) == (True, False)
    assert rows(api) == allow(I, [FRONT], TCP, 8080)
    assert api.origins == ("NetworkPolicy/production/allow-frontend",)
    assert not e.compile_endpoint(FRONT).ingress_enforced


def test_seed_api_l7_policy_redirects_to_the_http_proxy():
    e = engine([_yaml(SEED_API_L7)])
    api = e.compile_endpoint(API)
    assert rows(api) == allow(I, [FRONT], TCP, 8080)
    entry = PolicyEntry("ingress", FRONT, TCP, 8080, proxy_port=PROXY_PORTS[("http", "ingress")])
    (annotation,) = api.l7[entry]
    assert annotation.kind == "http" and annotation.origin == "CiliumNetworkPolicy/production/api-l7-policy"
    assert [(r.method, r.path) for r in annotation.rules.http] == [
        ("GET", "/api/v1/users"), ("GET", "/api/v1/health"), ("POST", "/api/v1/users")]
    assert api.l7_enforced is True and not any("not enforced" in n for n in api.notes)


def test_l4_allow_of_the_same_port_allows_every_request():
    """Cilium: a peer+port allowed without L7 rules is not restricted by another rule's HTTP rules."""
    plain = _yaml(SEED_API_L7.replace("api-l7-policy", "plain").split("      rules:")[0])
    e = engine([_yaml(SEED_API_L7), plain])
    api = e.compile_endpoint(API)
    assert [x.proxy_port for x in api.entries if x.port == 8080] == [0]


def test_seed_aws_egress():
    e = engine([_yaml(SEED_AWS_EGRESS)])
    api = e.compile_endpoint(API)
    assert (api.ingress_enforced, api.egress_enforced) == (False, True)
    assert rows(api) == allow(E, [DNS], UDP, 53)
    dns_proxy = PROXY_PORTS[("dns", "egress")]
    assert api.l7[PolicyEntry("egress", DNS, UDP, 53, proxy_port=dns_proxy)][0].kind == "dns"


def test_seed_aws_egress_selects_what_the_dns_proxy_learned_outside_the_cluster():
    e = engine([_yaml(SEED_AWS_EGRESS)])
    learned = {"52.216.1.1": frozenset({"s3.amazonaws.com."}), "198.51.100.7": frozenset({"api.stripe.com."}),
               "198.51.100.9": frozenset({"example.org."}), "10.244.1.5": frozenset({"evil.amazonaws.com."})}
    e.update(fqdn_ips=learned, endpoint_ips={FRONT: ["10.244.1.5"]})
    ids = e.cidr_identities()
    assert set(ids) == {"52.216.1.1/32", "198.51.100.7/32"}  # not example.org, never a pod's address
    assert {str(lbl) for lbl in e.cache.identities[ids["52.216.1.1/32"]]} >= {"fqdn:*.amazonaws.com",
                                                                               "cidr:52.216.1.1/32"}
    api = e.compile_endpoint(API)
    assert api.allows("egress", ids["52.216.1.1/32"], TCP, 443)
    assert api.allows("egress", ids["198.51.100.7/32"], TCP, 443)
    assert not api.allows("egress", idm.RESERVED_WORLD, TCP, 443)
    e.update(fqdn_ips={})
    assert e.cidr_identities() == {} and not e.compile_endpoint(API).allows("egress", ids["52.216.1.1/32"], TCP, 443)


def test_seed_bandwidth_limit_and_host_firewall_and_kafka_parse():
    processor = idm.pod_security_labels(pod_labels={"app": "data-processor"}, namespace="default").strings()
    e = PolicyEngine()
    e.update(policies=[_yaml(SEED_BANDWIDTH), _yaml(SEED_HOST_FIREWALL)], identities={400: processor})
    assert not e.errors
    assert rows(e.compile_endpoint(400)) == deny(E, [0])
    assert "10.0.0.0/8" in e.cidr_identities()
    kafka = cnp({"endpointSelector": APP_API, "ingress": [{"fromEndpoints": [{}], **_yaml(SEED_KAFKA_TOPORTS)}]})
    api = engine([kafka]).compile_endpoint(API)
    (annotation,) = api.l7[PolicyEntry("ingress", FRONT, TCP, 9092, proxy_port=PROXY_PORTS[("kafka", "ingress")])]
    assert [(k.role, k.topic) for k in annotation.rules.kafka] == [("consume", "user-events"), ("consume", "order-events")]


# --- incremental behaviour ---------------------------------------------------------------------------
def test_identity_added_later_becomes_a_peer_and_removal_drops_it():
    e = engine([_yaml(SEED_ALLOW_FRONTEND)])
    assert rows(e.compile_endpoint(API)) == allow(I, [FRONT], TCP, 8080)
    ids = {**IDENTITIES, 310: pod("frontend", "production", version="2")}
    e.update(identities=ids)
    assert rows(e.compile_endpoint(API)) == allow(I, [FRONT, 310], TCP, 8080)
    e.update(identities=IDENTITIES)
    assert rows(e.compile_endpoint(API)) == allow(I, [FRONT], TCP, 8080)


def test_policy_update_and_delete_take_effect():
    first = _yaml(SEED_ALLOW_FRONTEND)
    e = engine([first])
    changed = copy.deepcopy(first)
    changed["spec"]["ingress"][0]["ports"][0]["port"] = 9090
    e.update(policies=[changed])
    assert rows(e.compile_endpoint(API)) == allow(I, [FRONT], TCP, 9090)
    e.update(policies=[])
    result = e.compile_endpoint(API)
    assert (result.ingress_enforced, result.entries) == (False, ())


def test_cidr_identities_are_stable_and_released():
    e = engine([cnp({"endpointSelector": APP_API, "egress": [{"toCIDR": ["1.1.1.0/24"]}]}, "a")])
    first = e.cidr_identities()["1.1.1.0/24"]
    e.update(policies=[cnp({"endpointSelector": APP_API, "egress": [{"toCIDR": ["1.1.1.0/24"]}]}, "a"),
                       cnp({"endpointSelector": APP_API, "egress": [{"toCIDR": ["2.2.2.0/24"]}]}, "b")])
    assert e.cidr_identities()["1.1.1.0/24"] == first
    e.update(policies=[])
    assert e.cidr_identities() == {}


def test_caller_provided_cidr_allocator():
    given = {}
    e = PolicyEngine(cidr_allocator=lambda prefix: given.setdefault(prefix, (1 << 24) + 100 + len(given)))
    e.update(policies=[cnp({"endpointSelector": APP_API, "egress": [{"toCIDR": ["1.1.1.0/24"]}]})], identities=IDENTITIES)
    assert e.cidr_identities() == {"1.1.1.0/24": (1 << 24) + 100}
    assert rows(e.compile_endpoint(API)) == allow(E, [(1 << 24) + 100])


def test_invalid_policy_is_refused_and_others_still_compile():
    bad = cnp({"endpointSelector": APP_API, "ingress": [{"fromEntities": ["planet"]}]}, "bad")
    e = PolicyEngine()
    e.update(policies=[bad, _yaml(SEED_ALLOW_FRONTEND)], identities=IDENTITIES)
    assert e.errors["CiliumNetworkPolicy/production/bad"].field == "spec.ingress[0].fromEntities[0]"
    assert rows(e.compile_endpoint(API)) == allow(I, [FRONT], TCP, 8080)


def test_mirrored_k8s_records_are_accepted():
    seed = _yaml(SEED_API_L7)
    record = K8sObject(kind="CiliumNetworkPolicy", namespace="production", name="api-l7-policy", uid="u",
                       resource_version="7", fields={"spec": seed["spec"], "annotations": {"x.cilium.io/y": "z"}})
    e = PolicyEngine()
    e.update(policies=[record], identities=IDENTITIES, namespaces={"production": {}})
    assert rows(e.compile_endpoint(API)) == allow(I, [FRONT], TCP, 8080)
    selections = e.selections()
    assert selections["{any:app=frontend, k8s:io.kubernetes.pod.namespace=production}"] == [FRONT]
    assert e.compile_endpoint(API).to_json()["entries"][0]["l7"] == ["http"]


def test_ipblock_pod_ips_only_with_endpoint_ips_and_only_for_networkpolicy():
    block = np_({"podSelector": APP_API, "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/16"}}]}]}, "np")
    cidr_rule = cnp({"endpointSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"fromCIDR": ["10.244.0.0/16"]}]}, "c")
    e = engine([block, cidr_rule])
    cidr = e.cidr_identities()["10.244.0.0/16"]
    assert rows(e.compile_endpoint(API)) == allow(I, [cidr])  # Cilium-style without addresses
    e.update(endpoint_ips={FRONT: ["10.244.1.5"], FRONT_OTHER: ["10.244.2.5", "192.168.0.9"], DB: ["10.244.1.6"]})
    assert rows(e.compile_endpoint(API)) == allow(I, [cidr, FRONT, DB])  # FRONT_OTHER only partly inside
    assert rows(e.compile_endpoint(DB)) == allow(I, [cidr])  # CNP CIDRs never select pods


def test_allows_verdicts():
    e = engine([cnp({"endpointSelector": APP_API, "ingress": [{"fromEndpoints": [{}], "toPorts": [
        {"ports": [{"port": "8000", "endPort": 8010, "protocol": "TCP"}]}]}],
        "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "db"}}]}]})])
    r = e.compile_endpoint(API)
    assert r.allows("ingress", FRONT, TCP, 8005)
    assert not r.allows("ingress", FRONT, TCP, 8011)
    assert not r.allows("ingress", FRONT, UDP, 8005)
    assert not r.allows("ingress", DB, TCP, 8005)  # deny wins
    assert not r.allows("ingress", 2, TCP, 8005)
    assert r.allows("egress", 2, TCP, 443)  # egress not enforced


def test_all_addresses_with_a_hole_and_ipv6():
    e = engine([cnp({"endpointSelector": APP_API, "egress": [
        {"toCIDRSet": [{"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]}, {"cidr": "fd00::/8"}]}]})])
    ids = e.cidr_identities()
    assert set(ids) == {"0.0.0.0/0", "169.254.0.0/16", "fd00::/8"}
    assert rows(e.compile_endpoint(API)) == allow(E, [ids["0.0.0.0/0"], ids["fd00::/8"], 2, 9])
