"""Datapath guarantees below the policy layer (issue 20), on crafted packets (BPF_PROG_TEST_RUN):
ICMP errors are RELATED only between the two ends of the quoted connection, a service flow's
remembered backend is re-checked against its address, a new endpoint on a reused IP inherits no
conntrack, NodePort SNAT allocates a port per client flow (or drops with NAT_NO_MAPPING) and its
entries expire, and an ICMP rule for type 0 (EchoReply) is not "any type"."""

from __future__ import annotations

import ctypes

import pytest
from test_lb import VIP, LbHarness, fields, lb, service, tcp, udp  # noqa: F401  (lb: fixture)

from propolis.datapath import IPCacheEntry, PolicyEntry
from propolis.datapath import packets as pk
from propolis.lb import Backend
from propolis.maps import conntrack, drop, endpoints, events, policy
from propolis.maps import lb as lbmaps
from propolis.maps.spec import htons, ip4_to_be32
from propolis.policy.entries import icmp_type_port

pytestmark = pytest.mark.root

OK, SHOT = 0, 2
EGRESS, INGRESS = 2, 1
POD_A, POD_B, REMOTE, OUTSIDE = "10.244.1.10", "10.244.1.20", "10.244.2.30", "192.0.2.7"
ID_A, ID_B, ID_REMOTE = 1001, 1002, 1003
EP_A, EP_B = 11, 22


def _drops(h) -> list:
    return [e for e in h.events() if e.type == events.CILIUM_NOTIFY_DROP]


# ------------------------------------------------------------------ 1. ICMP RELATED
def test_icmp_errors_are_related_only_between_the_connection_ends(harness):
    h = harness
    h.endpoint(EP_A, POD_A, ID_A, egress=True, ingress=True)
    h.endpoint(EP_B, POD_B, ID_B, ingress=True)  # ingress deny-all
    h.dp.set_ipcache([IPCacheEntry(POD_A, ID_A), IPCacheEntry(POD_B, ID_B), IPCacheEntry(REMOTE, ID_REMOTE)])
    h.dp.set_policy(EP_A, [PolicyEntry("egress", identity=ID_REMOTE, protocol=17, port=53),
                           PolicyEntry("ingress", identity=ID_REMOTE, protocol=6, port=8080)])
    out_flow = pk.udp(POD_A, 33333, REMOTE, 53)          # A opened it (CT_EGRESS)
    in_flow = pk.tcp(REMOTE, 41000, POD_A, 8080)         # REMOTE opened it (CT_INGRESS)
    assert h.egress(out_flow) == OK and h.ingress(in_flow) == OK
    h.events()

    # exfiltration: A (egress: UDP 53 to REMOTE only) sends errors to a world address,
    # quoting its own flows (a packet it received on either of them)
    for quoted in (in_flow, pk.udp(REMOTE, 53, POD_A, 33333)):
        assert h.egress(pk.icmp_error(POD_A, OUTSIDE, quoted)) == SHOT
    # injection: a world host pushes an error into B (ingress deny-all) quoting A's flow
    assert h.ingress(pk.icmp_error(OUTSIDE, POD_B, out_flow)) == SHOT
    drops = _drops(h)
    assert [(d.drop_reason, d.icmp_type, d.direction) for d in drops] == [
        (drop.DROP_POLICY, 3, EGRESS), (drop.DROP_POLICY, 3, EGRESS), (drop.DROP_POLICY, 3, INGRESS)]
    assert (drops[2].src_ip, drops[2].dst_ip) == (OUTSIDE, POD_B)

    # genuine errors between the two ends pass as RELATED, whichever side opened the flow
    genuine = ((h.ingress, pk.icmp_error(REMOTE, POD_A, out_flow)),                       # about A's request
               (h.ingress, pk.icmp_error(REMOTE, POD_A, pk.tcp(POD_A, 8080, REMOTE, 41000))),  # A's reply
               (h.egress, pk.icmp_error(POD_A, REMOTE, in_flow)),                          # REMOTE's request
               (h.egress, pk.icmp_error(POD_A, REMOTE, pk.udp(REMOTE, 53, POD_A, 33333))))  # REMOTE's reply
    for run, packet in genuine:
        assert run(packet) == OK
    traces = [e for e in h.events() if e.type == events.CILIUM_NOTIFY_TRACE]
    assert [t.trace_reason for t in traces] == [4, 4, 4, 4]  # RELATED


# ------------------------------------------------------------------ 3. stale state
def test_service_flow_whose_backend_id_was_renumbered_is_reselected(lb):
    lb.pods()
    lb.dp.set_services([service(Backend(POD_B, 5353, "UDP"), port=53, protocol="UDP")])
    assert fields(lb.egress(udp(POD_A, 45000, VIP, 53))[1])[2:] == (POD_B, 5353)
    old_id = next(r.rx_packets for r in lb.dp.conntrack() if r.side == conntrack.CT_SERVICE)
    # backend ids renumbered (a writer restart on rebuilt maps): the flow's id now names another
    # Service's backend, the Service's slot a new id for the same pod
    backends = lb.dp._map(lbmaps.BACKENDS_SPEC.pin_name)
    services = lb.dp._map(lbmaps.SERVICES_SPEC.pin_name)
    new_id = old_id + 100
    backends.update(ctypes.c_uint32(new_id), lbmaps.backend_value(POD_B, 5353, 17, lbmaps.BE_STATE_ACTIVE))
    backends.update(ctypes.c_uint32(old_id), lbmaps.backend_value(REMOTE, 5353, 17, lbmaps.BE_STATE_ACTIVE))
    slot_key = lbmaps.service_key(VIP, 53, 17, slot=1)
    slot = services.lookup(slot_key)
    slot.backend_id = new_id
    services.update(slot_key, slot)
    for _ in range(3):
        assert fields(lb.egress(udp(POD_A, 45000, VIP, 53))[1])[2:] == (POD_B, 5353)
    assert [r.rx_packets for r in lb.dp.conntrack() if r.side == conntrack.CT_SERVICE] == [new_id]


def test_new_endpoint_on_a_reused_ip_inherits_no_conntrack(harness):
    h = harness
    h.endpoint(EP_A, POD_A, ID_A)
    h.endpoint(EP_B, POD_B, ID_B)
    assert h.ingress(pk.tcp(REMOTE, 41000, POD_A, 8080)) == OK
    assert h.egress(pk.udp(POD_A, 5000, REMOTE, 53)) == OK
    assert h.ingress(pk.tcp(REMOTE, 41001, POD_B, 8080)) == OK
    # the pod went away without its conntrack being scrubbed (a lost CNI DEL, an older writer)
    h.dp._map(endpoints.SPEC.pin_name).delete(endpoints.make_key(POD_A))
    h.dp._endpoints.pop(EP_A)
    # a new pod with ingress deny-all gets the address: the old flow's packets are NEW to it
    h.endpoint(33, POD_A, 1033, ingress=True)
    assert {(r.src, r.dst) for r in h.dp.conntrack()} == {(REMOTE, POD_B)}
    assert h.ingress(pk.tcp(REMOTE, 41000, POD_A, 8080, pk.TCP_ACK)) == SHOT
    assert h.ingress(pk.udp(REMOTE, 53, POD_A, 5000)) == SHOT
    assert h.ingress(pk.tcp(REMOTE, 41001, POD_B, 8080, pk.TCP_ACK)) == OK  # others untouched


def test_scrub_removes_every_entry_naming_the_address(harness):
    h = harness
    h.endpoint(EP_A, POD_A, ID_A)
    h.endpoint(EP_B, POD_B, ID_B)
    assert h.egress(pk.tcp(POD_A, 1000, POD_B, 80)) == OK and h.ingress(pk.tcp(POD_A, 1000, POD_B, 80)) == OK
    assert h.egress(pk.icmp(POD_A, REMOTE)) == OK
    assert h.egress(pk.udp(POD_B, 2000, REMOTE, 53)) == OK
    assert h.dp.scrub_conntrack(POD_A) == 3
    assert {(r.src, r.dst) for r in h.dp.conntrack()} == {(POD_B, REMOTE)}
    assert h.dp.scrub_conntrack(POD_A) == 0


# ------------------------------------------------------------------ 2. NodePort SNAT
NODE_IP, CLIENT1, CLIENT2 = "172.18.0.2", "172.18.0.9", "172.18.0.10"


def _nodeport_to_remote(lb: LbHarness, protocol: str = "UDP") -> None:
    lb.pods()
    lb.dp.set_services([service(Backend(REMOTE, 8080, protocol), ip=NODE_IP, port=30080, protocol=protocol,
                                ftype="NodePort")])


def test_nodeport_snat_gives_each_client_flow_its_own_port(lb):
    _nodeport_to_remote(lb)
    ret1, out1 = lb.netdev(udp(CLIENT1, 40000, NODE_IP, 30080))
    ret2, out2 = lb.netdev(udp(CLIENT2, 40000, NODE_IP, 30080))
    src1, port1, dst1, _ = fields(out1)
    src2, port2, dst2, _ = fields(out2)
    assert (src1, dst1, src2, dst2) == (NODE_IP, REMOTE, NODE_IP, REMOTE)
    assert port1 == 40000 and port2 != port1 and 32768 <= port2 <= 65535  # Cilium's NAT range
    # later packets keep their port; each reply goes back to its own client
    assert fields(lb.netdev(udp(CLIENT2, 40000, NODE_IP, 30080))[1])[1] == port2
    assert fields(lb.netdev(udp(CLIENT1, 40000, NODE_IP, 30080))[1])[1] == port1
    assert fields(lb.netdev(udp(REMOTE, 8080, NODE_IP, port2))[1]) == (NODE_IP, 30080, CLIENT2, 40000)
    assert fields(lb.netdev(udp(REMOTE, 8080, NODE_IP, port1))[1]) == (NODE_IP, 30080, CLIENT1, 40000)
    # a client port outside the range is never kept (it could be a node service's)
    assert 32768 <= fields(lb.netdev(udp(CLIENT1, 1000, NODE_IP, 30080))[1])[1] <= 65535


def test_nodeport_snat_entries_expire(lb):
    _nodeport_to_remote(lb)
    assert fields(lb.netdev(udp(CLIENT1, 40000, NODE_IP, 30080))[1])[1] == 40000
    snat = lb.dp._map(lbmaps.SNAT_SPEC.pin_name)
    for key, value in list(snat.items()):
        value.lifetime = conntrack.now_seconds() - 1
        snat.update(key, value)
    # an expired mapping restores nobody, and its port is free for the next client
    ret, out = lb.netdev(udp(REMOTE, 8080, NODE_IP, 40000))
    assert ret == OK and fields(out) == (REMOTE, 8080, NODE_IP, 40000)
    assert fields(lb.netdev(udp(CLIENT2, 40000, NODE_IP, 30080))[1])[1] == 40000
    assert fields(lb.netdev(udp(REMOTE, 8080, NODE_IP, 40000))[1])[2:] == (CLIENT2, 40000)


def test_nodeport_snat_without_a_free_port_drops_with_nat_no_mapping(lb):
    _nodeport_to_remote(lb)
    snat = lb.dp._map(lbmaps.SNAT_SPEC.pin_name)
    keys, values = [], []
    for port in range(32768, 65536):  # every port of the range taken by a live flow
        key = conntrack.CtTuple4(daddr=ip4_to_be32(NODE_IP), saddr=ip4_to_be32(REMOTE), dport=htons(port),
                                 sport=htons(8080), nexthdr=17, flags=conntrack.CT_INGRESS)
        keys.append(key)
        values.append(lbmaps.Ipv4NatEntry(lifetime=conntrack.now_seconds() + 60, to_addr=ip4_to_be32("172.18.1.1"),
                                          to_port=htons(port)))
    lbmaps.update_batch(snat, lbmaps.pack(keys), lbmaps.pack(values), len(keys))
    lb.h.events()
    ret, _ = lb.netdev(udp(CLIENT1, 40000, NODE_IP, 30080))
    assert ret == SHOT
    assert [d.drop_reason for d in _drops(lb.h)] == [drop.DROP_NAT_NO_MAPPING]
    assert drop.reason_name(drop.DROP_NAT_NO_MAPPING) == "NO_MAPPING_FOR_NAT_MASQUERADE"


def test_nodeport_snat_tcp_port_is_kept_across_the_connection(lb):
    _nodeport_to_remote(lb, "TCP")
    port1 = fields(lb.netdev(tcp(CLIENT1, 40000, NODE_IP, 30080))[1])[1]
    port2 = fields(lb.netdev(tcp(CLIENT2, 40000, NODE_IP, 30080))[1])[1]
    assert port1 != port2
    for flags in (pk.TCP_ACK, pk.TCP_ACK | pk.TCP_FIN):  # a half-close keeps the mapping alive
        assert fields(lb.netdev(tcp(CLIENT1, 40000, NODE_IP, 30080, flags))[1])[1] == port1
    rev = conntrack.CtTuple4(daddr=ip4_to_be32(NODE_IP), saddr=ip4_to_be32(REMOTE), dport=htons(port1),
                             sport=htons(8080), nexthdr=6, flags=conntrack.CT_INGRESS)
    entry = lb.dp._map(lbmaps.SNAT_SPEC.pin_name).lookup(rev)
    assert entry.lifetime - conntrack.now_seconds() > conntrack.CT_SYN_TIMEOUT
    assert fields(lb.netdev(tcp(REMOTE, 8080, NODE_IP, port1, pk.TCP_ACK | pk.TCP_FIN))[1])[2:] == (CLIENT1, 40000)
    entry = lb.dp._map(lbmaps.SNAT_SPEC.pin_name).lookup(rev)
    assert entry.lifetime - conntrack.now_seconds() <= conntrack.CT_CLOSE_TIMEOUT



# ------------------------------------------------------------------ 9. ICMP type 0
def test_an_echo_reply_rule_matches_echo_replies_only(harness):
    h = harness
    h.endpoint(EP_B, POD_B, ID_B, ingress=True)
    h.dp.set_ipcache([IPCacheEntry(REMOTE, ID_REMOTE)])
    h.dp.set_policy(EP_B, [PolicyEntry("ingress", identity=ID_REMOTE, protocol=1, port=icmp_type_port(0))])
    assert h.ingress(pk.icmp(REMOTE, POD_B, 0, ident=1)) == OK       # EchoReply: the rule's type
    assert h.ingress(pk.icmp(REMOTE, POD_B, 8, ident=2)) == SHOT     # Echo: another type
    assert h.ingress(pk.icmp(REMOTE, POD_B, 13, ident=3)) == SHOT    # Timestamp
    # protocol ICMP without a type still means every type
    h.dp.set_policy(EP_B, [PolicyEntry("ingress", identity=ID_REMOTE, protocol=1)])
    assert h.ingress(pk.icmp(REMOTE, POD_B, 8, ident=4)) == OK
    assert h.ingress(pk.icmp(REMOTE, POD_B, 13, ident=5)) == OK
    rows = [policy.describe_row(k, v) for k, (v, _, _) in h.dp.get_policy(EP_B).items()]
    assert [r["port_protocol"] for r in rows] == ["ANY/ICMP"]
    h.dp.set_policy(EP_B, [PolicyEntry("ingress", identity=ID_REMOTE, protocol=1, port=icmp_type_port(0))])
    rows = [policy.describe_row(k, v) for k, (v, _, _) in h.dp.get_policy(EP_B).items()]
    assert [r["port_protocol"] for r in rows] == ["0/ICMP"]
