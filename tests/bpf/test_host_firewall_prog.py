"""The host endpoint (hostFirewall) in bpf_host.c and bpf_lxc.c (BPF_PROG_TEST_RUN): the node's policy on
its netdev both ways, conntrack for what the node opened itself, a local pod's connection to its node,
audit mode; without the host endpoint row nothing is judged."""

from __future__ import annotations

import struct

import pytest

from propolis.datapath import IPCacheEntry, PolicyEntry
from propolis.datapath import packets as pk
from propolis.maps import bpf, drop, endpoints, events
from propolis.model.identity import RESERVED_HOST, RESERVED_REMOTE_NODE, RESERVED_WORLD

pytestmark = pytest.mark.root

TC_ACT_OK, TC_ACT_SHOT = 0, 2
NODE, OTHER_NODE, WORLD, POD = "172.30.9.1", "172.30.9.2", "198.51.100.7", "10.244.1.10"
ID_POD, EP_POD = 1001, 11
HOST = endpoints.HOST_ENDPOINT_ID
AUDIT, DROPPED = 4, 2
MARK_MAGIC_SNAT_DONE = 0x4C530000  # bpf/lib/lb.h


def from_netdev(h, frame: bytes) -> int:
    return bpf.prog_test_run(h.dp.programs.from_netdev_fd, frame)[0]


def to_netdev(h, frame: bytes) -> int:
    return bpf.prog_test_run(h.dp.programs.to_netdev_fd, frame)[0]


@pytest.fixture
def host(harness):
    """Node NODE as host endpoint, ingress enforced: TCP 10250 from remote nodes, nothing else."""
    h = harness
    h.dp.set_ipcache([IPCacheEntry(OTHER_NODE, RESERVED_REMOTE_NODE), IPCacheEntry(NODE, RESERVED_HOST),
                      IPCacheEntry(POD, ID_POD)])
    assert h.dp.set_host_endpoint(NODE, 1)
    h.dp.set_policy(HOST, [PolicyEntry("ingress", identity=RESERVED_REMOTE_NODE, protocol=6, port=10250)])
    h.dp.set_enforcement(HOST, ingress=True, egress=False)
    try:
        yield h
    finally:
        h.dp.remove_host_endpoint()


def test_host_ingress_policy_on_the_netdev(host):
    h = host
    assert from_netdev(h, pk.tcp(OTHER_NODE, 40000, NODE, 10250)) == TC_ACT_OK
    assert from_netdev(h, pk.tcp(OTHER_NODE, 40001, NODE, 22)) == TC_ACT_SHOT
    assert from_netdev(h, pk.tcp(WORLD, 40002, NODE, 10250)) == TC_ACT_SHOT
    verdicts = [e for e in h.events() if e.type == events.CILIUM_NOTIFY_POLICY_VERDICT]
    assert [(v.verdict, v.dst_port, v.endpoint_id) for v in verdicts] == [(1, 10250, HOST), (2, 22, HOST),
                                                                         (2, 10250, HOST)]
    assert verdicts[2].src_identity == RESERVED_WORLD and verdicts[2].dst_identity == RESERVED_HOST
    # the allowed connection goes on (conntrack), the node's reply leaves
    assert from_netdev(h, pk.tcp(OTHER_NODE, 40000, NODE, 10250, flags=pk.TCP_ACK)) == TC_ACT_OK
    assert to_netdev(h, pk.tcp(NODE, 10250, OTHER_NODE, 40000, flags=pk.TCP_SYN | pk.TCP_ACK)) == TC_ACT_OK
    # traffic that is not the node's (a pod's, forwarded) is not judged here
    assert from_netdev(h, pk.tcp(WORLD, 40003, POD, 22)) == TC_ACT_OK


def test_replies_to_what_the_node_opened_pass_a_default_deny(host):
    h = host
    assert to_netdev(h, pk.tcp(NODE, 41000, WORLD, 443)) == TC_ACT_OK  # egress not enforced: tracked
    assert from_netdev(h, pk.tcp(WORLD, 443, NODE, 41000, flags=pk.TCP_SYN | pk.TCP_ACK)) == TC_ACT_OK
    assert from_netdev(h, pk.tcp(WORLD, 443, NODE, 41001, flags=pk.TCP_SYN | pk.TCP_ACK)) == TC_ACT_SHOT


def test_local_pod_to_its_node_meets_the_host_policy(host):
    h = host
    h.endpoint(EP_POD, POD, ID_POD)
    assert h.egress(pk.tcp(POD, 42000, NODE, 22)) == TC_ACT_SHOT
    drops = [e for e in h.events() if e.type == events.CILIUM_NOTIFY_DROP]
    assert [(d.endpoint_id, d.drop_reason, d.direction) for d in drops] == [(HOST, drop.DROP_POLICY, 1)]
    h.dp.set_policy(HOST, [PolicyEntry("ingress", identity=ID_POD, protocol=6, port=22)])
    assert h.egress(pk.tcp(POD, 42001, NODE, 22)) == TC_ACT_OK


def test_node_to_its_local_pod_meets_the_host_egress_policy(host):
    h = host
    h.endpoint(EP_POD, POD, ID_POD)
    assert h.ingress(pk.tcp(NODE, 43000, POD, 8080)) == TC_ACT_OK  # host egress not enforced
    h.dp.set_enforcement(HOST, ingress=True, egress=True)
    assert h.ingress(pk.tcp(NODE, 43001, POD, 8080)) == TC_ACT_SHOT
    drops = [e for e in h.events() if e.type == events.CILIUM_NOTIFY_DROP]
    assert [(d.endpoint_id, d.direction, d.dst_identity) for d in drops] == [(HOST, 2, ID_POD)]
    h.dp.set_policy(HOST, [PolicyEntry("egress", identity=ID_POD, protocol=6, port=8080)])
    assert h.ingress(pk.tcp(NODE, 43002, POD, 8080)) == TC_ACT_OK


def test_forwarded_nodeport_traffic_skips_host_egress_only_when_it_came_in_from_an_interface(host):
    """nodeport_redirect marks what it forwards with the node's address; a host process setting the same mark
    (SO_MARK) is still judged."""
    h = host
    h.dp.set_enforcement(HOST, ingress=True, egress=True)
    snat = pk.tcp(NODE, 33000, OTHER_NODE, 8080)

    def run(mark: int, ingress_ifindex: int) -> int:
        ctx = bytearray(192)
        struct.pack_into("=I", ctx, 8, mark)
        struct.pack_into("=II", ctx, 36, ingress_ifindex, 1)
        return bpf.prog_test_run(h.dp.programs.to_netdev_fd, snat, ctx=bytes(ctx))[0]

    assert run(MARK_MAGIC_SNAT_DONE, ingress_ifindex=1) == TC_ACT_OK
    assert run(MARK_MAGIC_SNAT_DONE, ingress_ifindex=0) == TC_ACT_SHOT
    assert run(0, ingress_ifindex=1) == TC_ACT_SHOT


def test_host_audit_mode_forwards_and_reports(host):
    h = host
    h.dp.set_enforcement(HOST, ingress=True, egress=False, audit=True)
    assert from_netdev(h, pk.tcp(WORLD, 40010, NODE, 22)) == TC_ACT_OK
    (v,) = [e for e in h.events() if e.type == events.CILIUM_NOTIFY_POLICY_VERDICT]
    assert (v.verdict, v.drop_reason, v.endpoint_id) == (AUDIT, drop.DROP_POLICY, HOST)


def test_no_host_endpoint_no_judgement(harness):
    h = harness
    assert from_netdev(h, pk.tcp(WORLD, 40020, NODE, 22)) == TC_ACT_OK
    assert to_netdev(h, pk.tcp(NODE, 41020, WORLD, 443)) == TC_ACT_OK
    assert not [e for e in h.events() if e.type == events.CILIUM_NOTIFY_POLICY_VERDICT]


async def test_bench_host_program_cost_runs_every_way_and_cleans_up():
    import os

    from propolis.maps.spec import default_pin_dir
    from propolis_sandbox.bench.host_firewall import measure_host_packet_cost

    rows = await measure_host_packet_cost(repeat=100, rounds=1)
    assert [r["way"] for r in rows] == ["no host endpoint", "host endpoint, no policy", "seed host-firewall enforced"]
    assert all(r["established_ns_per_packet"] > 0 for r in rows) and rows[2]["new_denied_ns_per_packet"] > 0
    mine = f"bench-host-{os.getpid()}-"  # its throw-away node's pins are gone
    assert not [d for d in os.listdir(os.path.dirname(default_pin_dir("x"))) if d.startswith(mine)]
