"""Conntrack never outlives its endpoint (issue 20, item 3), with real packets: detaching an
endpoint scrubs every entry naming its IP, so a new pod that gets the address (here: the same
interface re-attached with ingress deny-all) inherits no ESTABLISHED flow of the old one."""

from __future__ import annotations

import asyncio
import socket

import pytest
from datapath_topology import udp_probe
from pyroute2.netns import create_socket

from propolis.maps.drop import DROP_POLICY

pytestmark = pytest.mark.root

INGRESS = 1


def test_detach_scrubs_conntrack_and_a_new_pod_on_the_ip_inherits_nothing(node):
    dp, a, b, c = node.dp, node.pods["a"], node.pods["b"], node.pods["c"]
    for pod in (a, b, c):
        dp.set_enforcement(pod.endpoint_id, ingress=False, egress=False)
    listener = create_socket(a.netns, socket.AF_INET, socket.SOCK_STREAM, flags=0)
    client = create_socket(c.netns, socket.AF_INET, socket.SOCK_STREAM, flags=0)
    accepted = None
    try:
        listener.bind((a.ip, 7100))
        listener.listen(4)
        listener.settimeout(2)
        client.settimeout(2)
        client.connect((a.ip, 7100))        # c -> a: a's CT_INGRESS entry, c's CT_EGRESS entry
        accepted, _ = listener.accept()
        accepted.settimeout(1)
        client.sendall(b"before")
        assert accepted.recv(16) == b"before"
        assert udp_probe(c, b.ip, 5353)      # a flow not naming a
        assert any(a.ip in (r.src, r.dst) for r in dp.conntrack())

        async def replace_pod() -> None:
            try:
                await dp.detach_endpoint(a.endpoint_id)
                assert not [r for r in dp.conntrack() if a.ip in (r.src, r.dst)]
                assert [r for r in dp.conntrack() if (r.src, r.dst) == (c.ip, b.ip)]
                await dp.attach_endpoint(endpoint_id=a.endpoint_id, ip=a.ip, identity=a.identity, ifname=a.lxc,
                                         ingress_enforced=True, egress_enforced=False)
            finally:
                await dp._tc.close()

        asyncio.run(replace_pod())
        before = sum(r.packets for r in dp.metrics() if r.reason == DROP_POLICY and r.direction == INGRESS)
        client.sendall(b"after")             # the old flow is NEW to the new pod: its policy decides
        with pytest.raises(TimeoutError):
            accepted.recv(16)
        assert sum(r.packets for r in dp.metrics()
                   if r.reason == DROP_POLICY and r.direction == INGRESS) > before
    finally:
        for s in (accepted, client, listener):
            if s is not None:
                s.close()
        dp.set_enforcement(a.endpoint_id, ingress=False, egress=False)
