"""Validation of NetworkPolicy / CiliumNetworkPolicy documents: good ones parse, bad ones name the field."""

import copy

import pytest

from propolis.errors import ValidationError
from propolis.model.selectors import LabelSelector, equals, exists
from propolis.policy.parse import parse_policy_object
from propolis.policy.rules import CIDRRule, PeerRule, PortProtocol, PortRule


def cnp(spec=None, *, specs=None, kind="CiliumNetworkPolicy", ns="prod"):
    obj = {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": {"name": "p", "namespace": ns}}
    if spec is not None:
        obj["spec"] = spec
    if specs is not None:
        obj["specs"] = specs
    return obj


def np_(spec):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "prod"}, "spec": spec}


EP = {"matchLabels": {"app": "api"}}

GOOD_CNP_SPECS = [
    {"endpointSelector": {}},
    {"endpointSelector": EP, "ingress": [{}]},
    {"endpointSelector": EP, "ingress": [{"fromEndpoints": [{}]}]},
    {"endpointSelector": EP, "ingress": [{"fromEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "x"}}],
                                          "fromRequires": [{"matchLabels": {"env": "prod"}}]}]},
    {"endpointSelector": EP, "ingress": [{"fromEntities": ["world", "cluster", "host", "remote-node",
                                                            "kube-apiserver", "health", "init", "unmanaged",
                                                            "ingress", "all", "none", "world-ipv4", "world-ipv6"]}]},
    {"endpointSelector": EP, "ingress": [{"fromCIDR": ["10.0.0.0/8", "192.168.1.1"],
                                          "fromCIDRSet": [{"cidr": "172.16.0.0/12", "except": ["172.16.1.0/24"]},
                                                          {"cidrGroupRef": "my-group"}]}]},
    {"endpointSelector": EP, "egress": [{"toServices": [{"k8sService": {"serviceName": "s", "namespace": "n"}},
                                                        {"k8sServiceSelector": {"selector": {"matchLabels": {"a": "b"}}}}]}]},
    {"endpointSelector": EP, "egress": [{"toFQDNs": [{"matchName": "api.stripe.com"}, {"matchPattern": "*.amazonaws.com"}]}]},
    {"endpointSelector": EP, "egress": [{"toGroups": [{"aws": {"securityGroupsIds": ["sg-1"], "region": "eu"}}]}]},
    {"endpointSelector": EP, "egress": [{"toNodes": [{"matchLabels": {"role": "worker"}}]}]},
    {"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "80"}, {"port": "8000", "endPort": 8100, "protocol": "TCP"},
                                                                 {"port": "http", "protocol": "TCP"}, {"port": 53, "protocol": "UDP"},
                                                                 {"port": "9", "protocol": "SCTP"}, {"port": "0", "protocol": "ANY"}]}]}]},
    {"endpointSelector": EP, "ingress": [{"icmps": [{"fields": [{"type": 8, "family": "IPv4"}, {"type": "EchoRequest"},
                                                                {"type": "EchoRequest", "family": "IPv6"}]}]}]},
    {"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}], "rules": {
        "http": [{"method": "GET", "path": "/api/v1/.*", "host": "example.com", "headers": ["X-Token: 1"],
                  "headerMatches": [{"name": "X-A", "value": "b", "mismatch": "LOG"},
                                    {"name": "X-S", "secret": {"namespace": "n", "name": "s"}}]}]}}]}]},
    {"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "9092", "protocol": "TCP"}], "rules": {
        "kafka": [{"role": "consume", "topic": "user-events"}, {"apiKey": "produce", "apiVersion": "2", "clientID": "c"}]}}]}]},
    {"endpointSelector": EP, "egress": [{"toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}], "rules": {
        "dns": [{"matchPattern": "*"}, {"matchName": "cilium.io"}]}}]}]},
    {"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "6379"}], "rules": {
        "l7proto": "r2d2", "l7": [{"cmd": "READ", "file": "/public/.*"}]}}]}]},
    {"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "443"}], "serverNames": ["a.com"],
                                                       "terminatingTLS": {"secret": {"name": "s", "namespace": "n"}},
                                                       "originatingTLS": {"secret": {"name": "ca"}, "trustedCA": "x"},
                                                       "listener": {"envoyConfig": {"kind": "CiliumEnvoyConfig", "name": "e"},
                                                                    "name": "l", "priority": 10}}]}]},
    {"endpointSelector": EP, "ingress": [{"fromEndpoints": [{}], "authentication": {"mode": "required"}}]},
    {"endpointSelector": EP, "ingressDeny": [{"fromEntities": ["world"], "toPorts": [{"ports": [{"port": "22"}]}]}],
     "egressDeny": [{"toCIDR": ["1.1.1.1/32"], "icmps": [{"fields": [{"type": 8}]}]}]},
    {"endpointSelector": EP, "enableDefaultDeny": {"ingress": False, "egress": True}, "description": "d",
     "labels": [{"key": "k", "value": "v", "source": "my"}]},
]


@pytest.mark.parametrize("spec", GOOD_CNP_SPECS)
def test_good_cnp_specs_parse(spec):
    policy = parse_policy_object("CiliumNetworkPolicy", cnp(copy.deepcopy(spec)))
    assert len(policy.rules) == 1 and policy.namespace == "prod"


def test_specs_list_and_ccnp():
    policy = parse_policy_object("CiliumNetworkPolicy", cnp(specs=[{"endpointSelector": EP}, {"endpointSelector": {}}]))
    assert len(policy.rules) == 2
    ccnp = cnp({"nodeSelector": {"matchLabels": {"node-role.kubernetes.io/worker": ""}},
                "ingress": [{"fromEntities": ["cluster"]}]}, kind="CiliumClusterwideNetworkPolicy")
    del ccnp["metadata"]["namespace"]
    parsed = parse_policy_object("CiliumClusterwideNetworkPolicy", ccnp)
    assert parsed.namespace == "" and parsed.rules[0].subject is None and parsed.rules[0].node_subject is not None


BAD_CNP = [
    # (spec, field)
    ({}, "spec"),
    ({"endpointSelector": EP, "nodeSelector": EP}, "spec"),
    ({"endpointSelector": EP, "nodeSelector": None, "bogus": 1}, "spec.bogus"),
    ({"endpointSelector": EP, "nodeSelector": None}, None),  # nodeSelector null is absent: fine
    ({"nodeSelector": EP}, "spec.nodeSelector"),  # not in a namespaced CNP
    ({"endpointSelector": {"matchLabels": {"k8s:io.kubernetes.pod.namespace": "other"}}}, "spec.endpointSelector"),
    ({"endpointSelector": EP, "ingress": {}}, "spec.ingress"),
    ({"endpointSelector": EP, "ingress": [{"toEndpoints": [{}]}]}, "spec.ingress[0].toEndpoints"),
    ({"endpointSelector": EP, "egress": [{"fromEndpoints": [{}]}]}, "spec.egress[0].fromEndpoints"),
    ({"endpointSelector": EP, "ingress": [{"fromEndpoints": [{"matchLabels": {"a": 5}}]}]},
     "spec.ingress[0].fromEndpoints[0].matchLabels.a"),
    ({"endpointSelector": EP, "ingress": [{"fromEntities": ["planet"]}]}, "spec.ingress[0].fromEntities[0]"),
    ({"endpointSelector": EP, "ingress": [{"fromCIDR": ["10.0.0.0/33"]}]}, "spec.ingress[0].fromCIDR[0]"),
    ({"endpointSelector": EP, "ingress": [{"fromCIDR": ["not-a-cidr"]}]}, "spec.ingress[0].fromCIDR[0]"),
    ({"endpointSelector": EP, "ingress": [{"fromCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}]}]},
     "spec.ingress[0].fromCIDRSet[0].except[0]"),
    ({"endpointSelector": EP, "ingress": [{"fromCIDRSet": [{"except": ["10.0.0.0/16"]}]}]}, "spec.ingress[0].fromCIDRSet[0]"),
    ({"endpointSelector": EP, "ingress": [{"fromCIDRSet": [{"cidr": "10.0.0.0/8", "exceptions": []}]}]},
     "spec.ingress[0].fromCIDRSet[0].exceptions"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "70000"}]}]}]},
     "spec.ingress[0].toPorts[0].ports[0].port"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": -1}]}]}]},
     "spec.ingress[0].toPorts[0].ports[0].port"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "Bad_Name"}]}]}]},
     "spec.ingress[0].toPorts[0].ports[0].port"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "tcp"}]}]}]},
     "spec.ingress[0].toPorts[0].ports[0].protocol"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "GRE"}]}]}]},
     "spec.ingress[0].toPorts[0].ports[0].protocol"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "90", "endPort": 80}]}]}]},
     "spec.ingress[0].toPorts[0].ports[0].endPort"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "http", "endPort": 80}]}]}]},
     "spec.ingress[0].toPorts[0].ports[0].endPort"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "80", "endPort": 70000}]}]}]},
     "spec.ingress[0].toPorts[0].ports[0].endPort"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "80", "proto": "TCP"}]}]}]},
     "spec.ingress[0].toPorts[0].ports[0].proto"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": str(p)} for p in range(1, 42)]}]}]},
     "spec.ingress[0].toPorts[0].ports"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{"method": "GET", "verb": "x"}]}}]}]},
     "spec.ingress[0].toPorts[0].rules.http[0].verb"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{"path": "(unclosed"}]}}]}]},
     "spec.ingress[0].toPorts[0].rules.http[0].path"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{"headerMatches": [{"value": "x"}]}]}}]}]},
     "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].name"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{"headerMatches": [{"name": "a", "mismatch": "DROP"}]}]}}]}]},
     "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].mismatch"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{}], "kafka": [{}]}}]}]},
     "spec.ingress[0].toPorts[0].rules"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "UDP"}], "rules": {"http": [{}]}}]}]},
     "spec.ingress[0].toPorts[0].ports[0].protocol"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "9092"}], "rules": {"kafka": [{"role": "read"}]}}]}]},
     "spec.ingress[0].toPorts[0].rules.kafka[0].role"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "9092"}], "rules": {"kafka": [{"role": "consume", "apiKey": "fetch"}]}}]}]},
     "spec.ingress[0].toPorts[0].rules.kafka[0].role"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "9092"}], "rules": {"kafka": [{"apiKey": "nosuch"}]}}]}]},
     "spec.ingress[0].toPorts[0].rules.kafka[0].apiKey"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "9092"}], "rules": {"kafka": [{"topic": "bad topic"}]}}]}]},
     "spec.ingress[0].toPorts[0].rules.kafka[0].topic"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "9092"}], "rules": {"kafka": [{"apiVersion": "v2"}]}}]}]},
     "spec.ingress[0].toPorts[0].rules.kafka[0].apiVersion"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "53"}], "rules": {"dns": [{"matchPattern": "*"}]}}]}]},
     "spec.ingress[0].toPorts[0].rules.dns"),
    ({"endpointSelector": EP, "egress": [{"toPorts": [{"ports": [{"port": "53"}], "rules": {"dns": [{}]}}]}]},
     "spec.egress[0].toPorts[0].rules.dns[0]"),
    ({"endpointSelector": EP, "egress": [{"toPorts": [{"ports": [{"port": "53"}], "rules": {"dns": [{"matchName": "a", "matchPattern": "b"}]}}]}]},
     "spec.egress[0].toPorts[0].rules.dns[0]"),
    ({"endpointSelector": EP, "egress": [{"toPorts": [{"ports": [{"port": "53", "endPort": 60}], "rules": {"dns": [{"matchPattern": "*"}]}}]}]},
     "spec.egress[0].toPorts[0].ports[0].endPort"),
    ({"endpointSelector": EP, "egress": [{"toFQDNs": [{"matchName": "bad name!"}]}]}, "spec.egress[0].toFQDNs[0].matchName"),
    ({"endpointSelector": EP, "egress": [{"toFQDNs": [{"matchPattern": "a b"}]}]}, "spec.egress[0].toFQDNs[0].matchPattern"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"l7": [{"a": "b"}]}}]}]},
     "spec.ingress[0].toPorts[0].rules.l7proto"),
    ({"endpointSelector": EP, "ingress": [{"icmps": [{"fields": [{"type": 300}]}]}]}, "spec.ingress[0].icmps[0].fields[0].type"),
    ({"endpointSelector": EP, "ingress": [{"icmps": [{"fields": [{"type": "Ping"}]}]}]}, "spec.ingress[0].icmps[0].fields[0].type"),
    ({"endpointSelector": EP, "ingress": [{"icmps": [{"fields": [{"type": 8, "family": "IPv5"}]}]}]},
     "spec.ingress[0].icmps[0].fields[0].family"),
    ({"endpointSelector": EP, "ingress": [{"icmps": [{"fields": [{"type": 8}]}], "toPorts": [{"ports": [{"port": "80"}]}]}]},
     "spec.ingress[0].icmps"),
    ({"endpointSelector": EP, "ingress": [{"authentication": {"mode": "maybe"}}]}, "spec.ingress[0].authentication.mode"),
    ({"endpointSelector": EP, "ingressDeny": [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{}]}}]}]},
     "spec.ingressDeny[0].toPorts[0].rules"),
    ({"endpointSelector": EP, "ingressDeny": [{"authentication": {"mode": "required"}}]}, "spec.ingressDeny[0].authentication"),
    ({"endpointSelector": EP, "egressDeny": [{"toFQDNs": [{"matchName": "a.com"}]}]}, "spec.egressDeny[0].toFQDNs"),
    ({"endpointSelector": EP, "egress": [{"toServices": [{}]}]}, "spec.egress[0].toServices[0]"),
    ({"endpointSelector": EP, "egress": [{"toServices": [{"k8sService": {"name": "x"}}]}]}, "spec.egress[0].toServices[0].k8sService.name"),
    ({"endpointSelector": EP, "enableDefaultDeny": {"ingress": "yes"}}, "spec.enableDefaultDeny.ingress"),
    ({"endpointSelector": EP, "enableDefaultDeny": {"both": True}}, "spec.enableDefaultDeny.both"),
    ({"endpointSelector": EP, "description": 5}, "spec.description"),
    ({"endpointSelector": EP, "labels": [{"value": "v"}]}, "spec.labels[0].key"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "443"}], "listener": {"envoyConfig": {"kind": "Other", "name": "e"}, "name": "l"}}]}]},
     "spec.ingress[0].toPorts[0].listener.envoyConfig.kind"),
    ({"endpointSelector": EP, "ingress": [{"fromEndpoints": [{}], "fromEntities": ["world"]}]}, "spec.ingress[0].fromEntities"),
    ({"endpointSelector": EP, "egress": [{"toFQDNs": [{"matchName": "a.com"}], "toCIDR": ["1.1.1.1/32"]}]}, "spec.egress[0].toFQDNs"),
    ({"endpointSelector": EP, "ingress": [{"toPorts": [{"ports": [{"port": "443"}], "terminatingTLS": {"secret": {}}}]}]},
     "spec.ingress[0].toPorts[0].terminatingTLS.secret.name"),
]


@pytest.mark.parametrize("spec, field", BAD_CNP)
def test_bad_cnp_names_field(spec, field):
    if field is None:
        parse_policy_object("CiliumNetworkPolicy", cnp(spec))
        return
    with pytest.raises(ValidationError) as err:
        parse_policy_object("CiliumNetworkPolicy", cnp(spec))
    assert err.value.field == field, str(err.value)


def test_bad_field_in_specs_list_names_index():
    with pytest.raises(ValidationError) as err:
        parse_policy_object("CiliumNetworkPolicy", cnp(specs=[{"endpointSelector": {}}, {"endpointSelector": {}, "ingres": []}]))
    assert err.value.field == "specs[1].ingres"


@pytest.mark.parametrize("obj, field", [
    ({"apiVersion": "cilium.io/v1", "kind": "CiliumNetworkPolicy", "spec": {"endpointSelector": {}}}, "apiVersion"),
    ({"kind": "NetworkPolicy", "spec": {"endpointSelector": {}}}, "kind"),
    ({"kind": "CiliumNetworkPolicy", "metadata": {"name": "x"}}, "spec"),
    ({"kind": "CiliumNetworkPolicy", "specs": {}}, "specs"),
])
def test_bad_objects(obj, field):
    with pytest.raises(ValidationError) as err:
        parse_policy_object("CiliumNetworkPolicy", obj)
    assert err.value.field == field


IN_PROD = equals("k8s", "io.kubernetes.pod.namespace", "prod")  # a NetworkPolicy selects only in its namespace
ANY_NAMESPACE = exists("k8s", "io.kubernetes.pod.namespace")
SELECTS_NO_PEER = PeerRule()  # a selected direction with no rule: default deny

GOOD_NP = [  # spec -> (subject, ingress, egress) of the one Rule it becomes
    ({"podSelector": {}},
     (LabelSelector.of([IN_PROD]), (SELECTS_NO_PEER,), ())),
    ({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
     (LabelSelector.of([IN_PROD]), (SELECTS_NO_PEER,), (SELECTS_NO_PEER,))),
    ({"podSelector": {"matchLabels": {"app": "api"}}, "ingress": [{}], "egress": []},
     (LabelSelector.of([equals("k8s", "app", "api"), IN_PROD]), (PeerRule(entities=("all",)),), (SELECTS_NO_PEER,))),
    ({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}, {"namespaceSelector": {}},
                                              {"namespaceSelector": {"matchLabels": {"team": "a"}},
                                               "podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}},
                                              {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                                     "ports": [{"port": 80}, {"port": "http"}, {"protocol": "UDP"},
                                               {"port": 8000, "endPort": 9000, "protocol": "SCTP"}]}]},
     (LabelSelector.of([IN_PROD]), (PeerRule(
         endpoints=(LabelSelector.of([IN_PROD]), LabelSelector.of([ANY_NAMESPACE]),
                    LabelSelector.of([exists("k8s", "app"), equals("k8s", "io.cilium.k8s.namespace.labels.team", "a"),
                                      ANY_NAMESPACE])),
         cidrs=(CIDRRule("10.0.0.0/8", ("10.1.0.0/16",)),),
         to_ports=(PortRule(ports=(PortProtocol(80, protocol="TCP"), PortProtocol(name="http", protocol="TCP"),
                                   PortProtocol(protocol="UDP"), PortProtocol(8000, end_port=9000, protocol="SCTP"))),),
         k8s_ipblock=True),), ())),
]


@pytest.mark.parametrize("spec, expected", GOOD_NP)
def test_good_network_policies(spec, expected):
    policy = parse_policy_object("NetworkPolicy", np_(spec))
    assert (policy.kind, policy.namespace, policy.name, len(policy.rules)) == ("NetworkPolicy", "prod", "p", 1)
    rule = policy.rules[0]
    assert (rule.subject, rule.ingress, rule.egress) == expected
    assert (rule.ingress_deny, rule.egress_deny, rule.origin) == ((), (), "NetworkPolicy/prod/p")


BAD_NP = [
    ({}, "spec.podSelector"),
    ({"podSelector": {}, "policyTypes": ["ingress"]}, "spec.policyTypes[0]"),
    ({"podSelector": {}, "ingress": [{"from": [{}]}]}, "spec.ingress[0].from[0]"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]},
     "spec.ingress[0].from[0].ipBlock"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"except": ["10.0.0.0/8"]}}]}]}, "spec.ingress[0].from[0].ipBlock.cidr"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/7"]}}]}]},
     "spec.ingress[0].from[0].ipBlock.except[0]"),
    ({"podSelector": {}, "ingress": [{"to": []}]}, "spec.ingress[0].to"),
    ({"podSelector": {}, "egress": [{"to": [{"podSelector": {"matchLabels": {"k8s:app": "x"}}}]}]},
     "spec.egress[0].to[0].podSelector.matchLabels.k8s:app"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "protocol": "ICMP"}]}]}, "spec.ingress[0].ports[0].protocol"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 0x10000}]}]}, "spec.ingress[0].ports[0].port"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 90}]}]}, "spec.ingress[0].ports[0].endPort"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 100, "endPort": 90}]}]}, "spec.ingress[0].ports[0].endPort"),
    ({"podSelector": {}, "ingress": [{"ports": [{"endPort": 90}]}]}, "spec.ingress[0].ports[0].endPort"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": True}]}]}, "spec.ingress[0].ports[0].port"),
    ({"podSelector": {}, "ingres": []}, "spec.ingres"),
]


@pytest.mark.parametrize("spec, field", BAD_NP)
def test_bad_network_policies_name_field(spec, field):
    with pytest.raises(ValidationError) as err:
        parse_policy_object("NetworkPolicy", np_(spec))
    assert err.value.field == field, str(err.value)
