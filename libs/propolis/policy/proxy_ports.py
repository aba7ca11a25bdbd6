"""The node's proxy listener ports: which port a policy entry redirects to, per L7 family and direction.

The policy compiler writes these ports into policy entries; each proxy listens on its own (the
l7-proxy on HTTP and Kafka, the dns-proxy on DNS). The rest of the redirect contract (marks, the
proxy route, transparent sockets) is `propolis.l7.redirect`. Numbers mirror bpf/lib/proxy.h.
"""

from __future__ import annotations

from collections.abc import Iterable

#: (L7 family, direction) -> the node's proxy listener port. Only families a proxy enforces are here:
#: the compiler leaves other families' ports L4-allowed (and says so) instead of redirecting them.
PROXY_PORTS: dict[tuple[str, str], int] = {
    ("http", "ingress"): 10080,
    ("http", "egress"): 10081,
    ("kafka", "ingress"): 10092,  # the l7-proxy's Kafka listeners (l7/kafka_proxy.py)
    ("kafka", "egress"): 10093,
    ("dns", "egress"): 10053,  # the dns-proxy (UDP and TCP); Cilium's DNS proxy is egress only
}

#: the L7 families a proxy enforces (rules of other families leave their port L4-allowed)
ENFORCED_FAMILIES = frozenset(family for family, _ in PROXY_PORTS)


def proxy_port_for(kinds: Iterable[str], direction: str) -> int:
    """The proxy port of an entry whose L7 rules are of these families; 0 = not redirected."""
    families = set(kinds)
    if len(families) != 1:
        return 0  # two families on one port: no proxy judges both
    return PROXY_PORTS.get((families.pop(), direction), 0)


def listener_direction(port: int) -> tuple[str, str]:
    """(family, direction) a listener port serves."""
    for key, value in PROXY_PORTS.items():
        if value == port:
            return key
    raise KeyError(f"port {port} is no proxy port")
