"""Fixture: a node namespace with pods a, b, c (echo servers on b), bpf_lxc compiled once
for the module and attached to every pod; torn down even when tests fail."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator

import pytest
from datapath_topology import EchoServers, Node, add_pod, add_remote, sh, teardown

from propolis.datapath import Datapath, IPCacheEntry


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    """Node namespace + pods a, b, c (echo servers on b) and remote pod r behind an underlay veth; bpf_lxc
    compiled once and attached."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    suffix = secrets.token_hex(3)
    octet = int(suffix[:2], 16) % 200 + 20
    n = Node(suffix, f"ppdp-node-{suffix}", f"10.250.{octet}")
    try:
        sh("ip", "netns", "add", n.netns)
        sh("ip", "netns", "exec", n.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # lo up gives the namespace a local routing table; without one the kernel classes
        # every neighbour as broadcast (NOARP, ff:ff:…) and TCP ignores the frames
        sh("ip", "-n", n.netns, "link", "set", "lo", "up")
        add_pod(n, "a", 10, endpoint_id=101, identity=40001)
        add_pod(n, "b", 20, endpoint_id=102, identity=40002)
        add_pod(n, "c", 30, endpoint_id=103, identity=40003)
        add_remote(n, "r", 50, identity=40050, underlay_octet=octet)
        n.servers.append(EchoServers(n.pods["b"], tcp_ports=(8080, 8081, 9000), udp_ports=(5353,)))
        n.servers.append(EchoServers(n.remotes["r"], tcp_ports=(7000,), udp_ports=()))

        n.dp = Datapath(f"ppdp-{suffix}", netns=n.netns)
        n.dp.load_sync()
        print(f"\n[datapath] compile+load: {n.dp.compile_seconds:.3f} s")
        n.dp.set_ipcache([IPCacheEntry(p.ip, p.identity) for p in (*n.pods.values(), *n.remotes.values())])

        async def attach_all() -> None:
            await n.dp.prepare_endpoints([p.endpoint_id for p in n.pods.values() if p.name != "a"])
            for pod in n.pods.values():
                result = await n.dp.attach_endpoint(endpoint_id=pod.endpoint_id, ip=pod.ip, identity=pod.identity,
                                                    ifname=pod.lxc, ingress_enforced=False, egress_enforced=False)
                print(f"[datapath] attach endpoint {pod.endpoint_id} ({pod.lxc}, policy map "
                      f"{'created' if result.created_policy_map else 'prepared'}): {result.seconds * 1000:.1f} ms")
            await n.dp._tc.close()

        asyncio.run(attach_all())
        yield n
    finally:
        teardown(n)
