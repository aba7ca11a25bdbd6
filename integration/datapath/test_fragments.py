"""IPv4 fragments with real packets (issue 20, item 4): a UDP datagram bigger than the pods'
MTU (1500) leaves the sender as fragments; the datapath tracks them by datagram id like
Cilium's cilium_ipv4_frag_datagrams, so they meet conntrack and policy as one flow. They
used to be dropped (157 "IP fragmentation not supported"): 1,400 bytes got an answer,
1,500 and 4,000 did not (large DNS answers, syslog, NFS over UDP break)."""

from __future__ import annotations

import socket

import pytest
from datapath_topology import Node, Pod
from pyroute2.netns import create_socket

from propolis.datapath import PolicyEntry
from propolis.maps.drop import DROP_FRAG_NOSUPPORT, DROP_FRAG_NOT_FOUND, DROP_POLICY

pytestmark = pytest.mark.root

INGRESS = 1


def udp_echo(pod: Pod, ip: str, port: int, size: int, timeout: float = 0.8) -> bool:
    """One datagram of `size` bytes from `pod`; True when the same bytes come back."""
    payload = bytes(i % 251 for i in range(size))
    u = create_socket(pod.netns, socket.AF_INET, socket.SOCK_DGRAM, flags=0)
    u.settimeout(timeout)
    try:
        u.sendto(payload, (ip, port))
        data, _ = u.recvfrom(65535)
        return data == payload
    except (TimeoutError, OSError):
        return False
    finally:
        u.close()


def drops(node: Node, reason: int) -> int:
    assert node.dp is not None
    return sum(r.packets for r in node.dp.metrics() if r.reason == reason)


def test_fragmented_udp_datagrams_get_their_answers(node):
    a, b = node.pods["a"], node.pods["b"]
    for size in (1400, 1500, 4000):
        assert udp_echo(a, b.ip, 5353, size), f"{size}-byte datagram got no answer"
    assert drops(node, DROP_FRAG_NOSUPPORT) == drops(node, DROP_FRAG_NOT_FOUND) == 0


def test_policy_applies_to_the_whole_datagram(node):
    dp, a, b, c = node.dp, node.pods["a"], node.pods["b"], node.pods["c"]
    assert dp is not None
    dp.set_policy(b.endpoint_id, [PolicyEntry("ingress", identity=a.identity, protocol=17, port=5353)])
    dp.set_enforcement(b.endpoint_id, ingress=True, egress=False)
    try:
        assert udp_echo(a, b.ip, 5353, 4000)
        before = sum(r.packets for r in dp.metrics() if r.reason == DROP_POLICY and r.direction == INGRESS)
        assert not udp_echo(c, b.ip, 5353, 4000)
        denied = sum(r.packets for r in dp.metrics() if r.reason == DROP_POLICY and r.direction == INGRESS)
        assert denied - before == 3  # every fragment of the datagram (4008 B in 1500-byte packets)
        assert drops(node, DROP_FRAG_NOT_FOUND) == 0
    finally:
        dp.set_enforcement(b.endpoint_id, ingress=False, egress=False)
        dp.set_policy(b.endpoint_id, [])
