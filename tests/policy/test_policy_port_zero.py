"""Port 0: refused in a NetworkPolicy (Kubernetes: 1-65535 when numeric); in a CiliumNetworkPolicy `"0"` means
every port, but only for the rule's own peers — never a wildcard peer (issue 11, fail-open scenario 4)."""

import pytest
from test_policy_compile import API, FRONT, FRONT_OTHER, TCP, UDP, I, allow, cnp, engine, np_, rows

from propolis.errors import ValidationError
from propolis.policy import parse

FROM_FRONT = [{"matchLabels": {"app": "frontend"}}]


@pytest.mark.parametrize("port", [0, "0"])
def test_networkpolicy_port_zero_is_refused_naming_the_field(port):
    doc = np_({"podSelector": {"matchLabels": {"app": "api"}},
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}],
                            "ports": [{"protocol": "TCP", "port": 80}, {"protocol": "TCP", "port": port}]}]})
    with pytest.raises(ValidationError) as err:
        parse.parse_policy_object("NetworkPolicy", doc)
    assert err.value.field == "spec.ingress[0].ports[1].port"
    assert "must be between 1 and 65535" in err.value.reason


def test_networkpolicy_without_port_still_means_every_port_of_its_peers():
    e = engine([np_({"podSelector": {"matchLabels": {"app": "api"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}],
                                  "ports": [{"protocol": "TCP"}]}]})])
    assert rows(e.compile_endpoint(API)) == allow(I, [FRONT], TCP, 0)


@pytest.mark.parametrize("protocol, protos", [("TCP", [TCP]), ("UDP", [UDP]), ("ANY", [0])])
def test_cnp_port_zero_is_every_port_for_the_rules_own_peers_only(protocol, protos):
    e = engine([cnp({"endpointSelector": {"matchLabels": {"app": "api"}},
                     "ingress": [{"fromEndpoints": FROM_FRONT,
                                  "toPorts": [{"ports": [{"port": "0", "protocol": protocol}]}]}]})])
    got = rows(e.compile_endpoint(API))
    assert got == set().union(*(allow(I, [FRONT], p, 0) for p in protos))
    assert all(r[1] == FRONT for r in got)  # never identity 0 (any peer), never frontend of another namespace
    assert not any(r[1] in (0, FRONT_OTHER) for r in got)


def test_cnp_port_zero_next_to_a_real_port_keeps_both_for_the_same_peer():
    e = engine([cnp({"endpointSelector": {"matchLabels": {"app": "api"}},
                     "ingress": [{"fromEndpoints": FROM_FRONT,
                                  "toPorts": [{"ports": [{"port": "0", "protocol": "UDP"},
                                                         {"port": "8080", "protocol": "TCP"}]}]}]})])
    assert rows(e.compile_endpoint(API)) == allow(I, [FRONT], UDP, 0) | allow(I, [FRONT], TCP, 8080)
