"""The datapath's skb marks are trusted only on packets it marked itself (issue 20, minor), on
crafted packets (BPF_PROG_TEST_RUN with an __sk_buff context): cil_to_container used to
skip conntrack and policy for ANY packet carrying the hairpin mark 0x4c48…, so a host
process with SO_MARK reached a pod its ingress policy denies; the NodePort mark chose the
reverse NAT of any Service. A hairpin packet comes back in from the pod's own veth and a
NodePort packet from an interface; a locally sent one has no ingress interface."""

from __future__ import annotations

import socket
import struct

import pytest

from propolis.datapath import packets as pk
from propolis.maps import bpf, conntrack
from propolis.maps.drop import DROP_POLICY

pytestmark = pytest.mark.root

OK, SHOT = 0, 2
INGRESS = 1
POD_A, REMOTE = "10.244.1.10", "10.244.2.30"
MARK_HAIRPIN, MARK_NODEPORT = 0x4C480000, 0x4C4E0000
LOOPBACK = 1  # BPF_PROG_TEST_RUN runs the skb on loopback


def skb_ctx(mark: int, ingress_ifindex: int) -> bytes:
    """struct __sk_buff with mark (offset 8), ingress_ifindex (36) and ifindex (40) set."""
    ctx = bytearray(192)
    struct.pack_into("=I", ctx, 8, mark)
    struct.pack_into("=II", ctx, 36, ingress_ifindex, LOOPBACK)
    return bytes(ctx)


def to_container(h, packet: bytes, mark: int, ingress_ifindex: int) -> int:
    assert h.dp.programs is not None
    return bpf.prog_test_run(h.dp.programs.to_container_fd, packet, ctx=skb_ctx(mark, ingress_ifindex))[0]


def test_hairpin_mark_from_a_host_process_meets_policy(harness):
    h = harness
    h.endpoint(11, POD_A, 1001, ingress=True)  # ingress deny-all
    assert to_container(h, pk.tcp(REMOTE, 40000, POD_A, 80), MARK_HAIRPIN, 0) == SHOT
    assert h.metric(DROP_POLICY, INGRESS) == 1
    # the datapath's own hairpin packet (back in from the pod's veth) is still trusted
    assert to_container(h, pk.tcp(REMOTE, 40001, POD_A, 80), MARK_HAIRPIN, LOOPBACK) == OK


def test_nodeport_mark_from_a_host_process_chooses_no_reverse_nat(harness):
    h = harness
    h.endpoint(11, POD_A, 1001)
    assert to_container(h, pk.tcp(REMOTE, 40000, POD_A, 80), MARK_NODEPORT | 7, 0) == OK
    assert to_container(h, pk.tcp(REMOTE, 40001, POD_A, 80), MARK_NODEPORT | 7, 2) == OK
    rev_nat = {socket.ntohs(k.sport): v.rev_nat_index
               for k, v in h.dp._map(conntrack.TCP_SPEC.pin_name).items() if k.flags == conntrack.CT_INGRESS}
    assert rev_nat == {40000: 0, 40001: 7}
