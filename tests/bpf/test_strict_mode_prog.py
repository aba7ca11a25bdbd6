"""encryption.strictMode in cil_to_netdev (BPF_PROG_TEST_RUN): a packet leaving the node's underlay with both
ends in the strict CIDR is dropped as UNENCRYPTED_TRAFFIC (counted, reported from the sending pod); WireGuard's
own packets (node address to node address), pod traffic leaving the CIDR and everything with strict mode off
pass; allowRemoteNodeIdentities lets node addresses inside the CIDR through."""

from __future__ import annotations

from dataclasses import replace

import pytest

from propolis.datapath import IPCacheEntry
from propolis.datapath import packets as pk
from propolis.maps import bpf, events
from propolis.maps.drop import DROP_UNENCRYPTED_TRAFFIC
from propolis.model.identity import RESERVED_REMOTE_NODE

pytestmark = pytest.mark.root

TC_ACT_OK, TC_ACT_SHOT = 0, 2
EGRESS = 2
POD, REMOTE_POD, NODE, OTHER_NODE, WORLD = "10.244.1.10", "10.244.2.30", "172.30.9.1", "172.30.9.2", "198.51.100.7"
NODE_IN_POD_CIDR = "10.244.200.2"  # node and pod CIDRs overlap (allowRemoteNodeIdentities)
ID_POD, ID_REMOTE_POD, EP_POD = 1001, 1002, 11


def to_netdev(h, frame: bytes) -> int:
    return bpf.prog_test_run(h.dp.programs.to_netdev_fd, frame)[0]


@pytest.fixture
def strict(harness):
    """Strict mode on 10.244.0.0/16; the session's settings come back afterwards."""
    h = harness
    before = h.dp.settings
    h.endpoint(EP_POD, POD, ID_POD)
    h.dp.set_ipcache([IPCacheEntry(REMOTE_POD, ID_REMOTE_POD), IPCacheEntry(NODE_IN_POD_CIDR, RESERVED_REMOTE_NODE)])
    h.dp.apply_settings(replace(before, encryption_strict_mode_cidr="10.244.0.0/16"))
    try:
        yield h
    finally:
        h.dp.apply_settings(before)


def test_unencrypted_pod_to_pod_is_dropped_counted_and_reported(strict):
    h = strict
    assert to_netdev(h, pk.tcp(POD, 40000, REMOTE_POD, 8080)) == TC_ACT_SHOT
    assert to_netdev(h, pk.udp(POD, 40001, REMOTE_POD, 8080)) == TC_ACT_SHOT
    assert h.metric(DROP_UNENCRYPTED_TRAFFIC, EGRESS) == 2
    drops = [e for e in h.events() if e.type == events.CILIUM_NOTIFY_DROP]
    assert [(e.drop_reason, e.endpoint_id, e.src_identity, e.dst_identity, e.dst_port) for e in drops] == [
        (DROP_UNENCRYPTED_TRAFFIC, EP_POD, ID_POD, ID_REMOTE_POD, 8080)] * 2


def test_tunnel_packets_and_traffic_leaving_the_cidr_pass(strict):
    h = strict
    assert to_netdev(h, pk.udp(NODE, 51871, OTHER_NODE, 51871)) == TC_ACT_OK  # WireGuard itself
    assert to_netdev(h, pk.tcp(POD, 40000, WORLD, 443)) == TC_ACT_OK  # pod to the world
    assert to_netdev(h, pk.tcp(NODE, 40000, REMOTE_POD, 8080)) == TC_ACT_OK  # node to pod (no nodeEncryption)
    assert h.metric(DROP_UNENCRYPTED_TRAFFIC, EGRESS) == 0


def test_remote_node_inside_the_cidr_passes_only_when_allowed(strict):
    h = strict
    frame = pk.tcp(POD, 40000, NODE_IN_POD_CIDR, 10250)
    assert to_netdev(h, frame) == TC_ACT_SHOT
    h.dp.apply_settings(replace(h.dp.settings, encryption_strict_mode_allow_remote_node_identities=True))
    assert to_netdev(h, frame) == TC_ACT_OK
    assert to_netdev(h, pk.tcp(POD, 40001, REMOTE_POD, 8080)) == TC_ACT_SHOT  # pods still need the tunnel


def test_strict_mode_off_passes_everything(harness):
    h = harness
    assert not h.dp.settings.encryption_strict_mode_cidr
    assert to_netdev(h, pk.tcp(POD, 40000, REMOTE_POD, 8080)) == TC_ACT_OK
    assert h.metric(DROP_UNENCRYPTED_TRAFFIC, EGRESS) == 0
