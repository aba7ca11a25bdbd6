"""Accepted-but-not-enforced fields: each is named with its path and why, and becomes a status condition."""

from __future__ import annotations

import pytest

from propolis.errors import ValidationError
from propolis.k8s.status import NOT_ENFORCED, policy_conditions
from propolis.policy.parse import parse_policy_object
from propolis.policy.unenforced import not_enforced

PORT = {"ports": [{"port": "80", "protocol": "TCP"}]}


def cnp(**spec):  # type: ignore[no-untyped-def]
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"endpointSelector": {}, **spec}}


def test_http_rules_are_enforced_by_the_l7_proxy():
    assert not not_enforced(cnp(ingress=[{"toPorts": [{**PORT, "rules": {"http": [{"method": "GET"}]}}]}]))


def test_egress_dns_rules_and_to_fqdns_are_enforced_by_the_dns_proxy():
    dns = {"ports": [{"port": "53", "protocol": "UDP"}], "rules": {"dns": [{"matchPattern": "*"}]}}
    assert not not_enforced(cnp(egress=[{"toPorts": [dns]}, {"toFQDNs": [{"matchName": "example.com"}]}]))


@pytest.mark.parametrize("spec, field, why", [
    ({"ingress": [{"toPorts": [{**PORT, "rules": {"l7proto": "r2d2", "l7": [{"cmd": "READ"}]}}]}]},
     "spec.ingress[0].toPorts[0].rules", "L7 proxy"),
    ({"egress": [{"toGroups": [{"aws": {"securityGroupsIds": ["sg-1"]}}]}]}, "spec.egress[0].toGroups", "cloud"),
    ({"ingress": [{"fromEndpoints": [{}], "authentication": {"mode": "required"}}]},
     "spec.ingress[0].authentication.mode", "fail closed"),
    ({"egress": [{"toEntities": ["world", "ingress"]}]}, "spec.egress[0].toEntities[1]", "reserved:ingress"),
    ({"ingress": [{"fromEntities": ["unmanaged"]}]}, "spec.ingress[0].fromEntities[0]", "reserved:unmanaged"),
    ({"ingress": [{"toPorts": [{**PORT, "serverNames": ["a.example"]}]}]},
     "spec.ingress[0].toPorts[0].serverNames", "SNI"),
])
def test_each_unenforced_field_is_named_with_why(spec, field, why):  # type: ignore[no-untyped-def]
    obj = cnp(**spec)
    parse_policy_object("CiliumNetworkPolicy", obj)  # accepted
    (item,) = not_enforced(obj)
    assert item.field == field and why in item.reason
    valid, warning = policy_conditions(obj, None)
    assert valid["type"] == "Valid" and valid["status"] == "True"  # readers of conditions[0] keep working
    assert warning["type"] == NOT_ENFORCED and warning["status"] == "True"
    assert warning["reason"] == "FieldsNotEnforced" and field in warning["message"]


def test_enforced_fields_give_no_warning_and_paths_follow_specs():
    enforced = cnp(ingress=[{"fromEndpoints": [{}], "toPorts": [PORT], "authentication": {"mode": "disabled"}}],
                   egress=[{"toEntities": ["kube-apiserver", "health"]},
                           {"toServices": [{"k8sService": {"serviceName": "s"}}]},
                           {"toCIDRSet": [{"cidrGroupRef": "g"}]}, {"toNodes": [{"matchLabels": {"a": "b"}}]}],
                   ingressDeny=[{"fromEntities": ["world"]}])
    assert not_enforced(enforced) == []
    assert [c["type"] for c in policy_conditions(enforced, None)] == ["Valid"]
    both = {"kind": "CiliumClusterwideNetworkPolicy", "metadata": {"name": "c"}, "specs": [
        {"endpointSelector": {}, "egress": [{"toEndpoints": [{}]}]},
        {"nodeSelector": {}, "ingress": [{"fromEntities": ["cluster"]}]}]}
    assert [i.field for i in not_enforced(both)] == ["specs[1].nodeSelector"]


def test_a_refused_policy_carries_only_valid_false():
    obj = cnp(egress=[{"toFQDNs": [{"matchName": "example.com"}]}])
    (cond,) = policy_conditions(obj, ValidationError("spec.egress[0]", "bad"))
    assert cond["type"] == "Valid" and cond["status"] == "False"
