"""bpf_lxc programs on crafted packets (BPF_PROG_TEST_RUN): verdict, conntrack, metrics, events."""

from __future__ import annotations

import ctypes
import socket

import pytest

from propolis.datapath import IPCacheEntry, PolicyEntry
from propolis.datapath import packets as pk
from propolis.maps import conntrack, drop, events
from propolis.policy.entries import icmp_type_port

pytestmark = pytest.mark.root

TC_ACT_OK = 0
TC_ACT_SHOT = 2
EGRESS, INGRESS = 2, 1  # metric directions

POD_A, POD_B, REMOTE, OUTSIDE = "10.244.1.10", "10.244.1.20", "10.244.2.30", "192.0.2.7"
ID_A, ID_B, ID_REMOTE, ID_OTHER = 1001, 1002, 1003, 1004
EP_A, EP_B = 11, 22


def setup_ipcache(h) -> None:
    h.dp.set_ipcache([IPCacheEntry(POD_A, ID_A), IPCacheEntry(POD_B, ID_B),
                      IPCacheEntry(REMOTE, ID_REMOTE), IPCacheEntry("10.244.3.0/24", ID_OTHER)])


def test_not_enforced_allows_and_tracks(harness):
    h = harness
    h.endpoint(EP_A, POD_A, ID_A)
    setup_ipcache(h)
    assert h.egress(pk.tcp(POD_A, 40000, REMOTE, 80)) == TC_ACT_OK
    rows = [r for r in h.dp.conntrack() if r.dport == 80]
    assert len(rows) == 1 and rows[0].side == conntrack.CT_EGRESS
    assert rows[0].src_identity == ID_A and rows[0].dst_identity == ID_REMOTE
    assert h.metric(0, EGRESS) == 1
    evs = h.events()
    assert [e.type for e in evs] == [events.CILIUM_NOTIFY_TRACE]
    assert evs[0].trace_reason == 1 and evs[0].endpoint_id == EP_A  # NEW


def test_default_deny_when_enforced_then_allow(harness):
    h = harness
    h.endpoint(EP_B, POD_B, ID_B, ingress=True)
    setup_ipcache(h)
    syn = pk.tcp(REMOTE, 40001, POD_B, 8080)
    assert h.ingress(syn) == TC_ACT_SHOT
    assert h.metric(drop.DROP_POLICY, INGRESS) == 1
    evs = h.events()
    verdict = [e for e in evs if e.type == events.CILIUM_NOTIFY_POLICY_VERDICT]
    drops = [e for e in evs if e.type == events.CILIUM_NOTIFY_DROP]
    assert verdict and verdict[0].verdict == 2 and verdict[0].drop_reason == drop.DROP_POLICY
    assert drops and drops[0].drop_reason == drop.DROP_POLICY
    d = drops[0]
    assert (d.src_ip, d.src_port, d.dst_ip, d.dst_port, d.protocol) == (REMOTE, 40001, POD_B, 8080, 6)
    assert (d.src_identity, d.dst_identity, d.direction, d.endpoint_id) == (ID_REMOTE, ID_B, INGRESS, EP_B)
    assert d.tcp_flag_names == ["SYN"] and d.length == len(syn)
    assert not [r for r in h.dp.conntrack() if r.dport == 8080]

    h.dp.set_policy(EP_B, [PolicyEntry("ingress", identity=ID_REMOTE, protocol=6, port=8080)])
    assert h.ingress(syn) == TC_ACT_OK
    verdict = [e for e in h.events() if e.type == events.CILIUM_NOTIFY_POLICY_VERDICT]
    assert verdict[0].verdict == 1 and verdict[0].match_type == 2  # FORWARDED, l3-l4
    # another identity, another port: still denied
    assert h.ingress(pk.tcp(REMOTE, 40002, POD_B, 8081)) == TC_ACT_SHOT
    assert h.ingress(pk.tcp("10.244.3.9", 40003, POD_B, 8080)) == TC_ACT_SHOT


def test_deny_beats_allow(harness):
    h = harness
    h.endpoint(EP_B, POD_B, ID_B, ingress=True)
    setup_ipcache(h)
    # allow everything from REMOTE, deny TCP 22 from anyone; allow TCP 80 from REMOTE but deny all from OTHER
    h.dp.set_policy(EP_B, [
        PolicyEntry("ingress", identity=ID_REMOTE),
        PolicyEntry("ingress", identity=0, protocol=6, port=22, deny=True),
        PolicyEntry("ingress", identity=ID_OTHER, protocol=6, port=80),
        PolicyEntry("ingress", identity=ID_OTHER, deny=True),
    ])
    assert h.ingress(pk.tcp(REMOTE, 1000, POD_B, 443)) == TC_ACT_OK
    assert h.ingress(pk.tcp(REMOTE, 1001, POD_B, 22)) == TC_ACT_SHOT
    assert h.metric(drop.DROP_POLICY_DENY, INGRESS) == 1
    assert h.ingress(pk.tcp("10.244.3.5", 1002, POD_B, 80)) == TC_ACT_SHOT  # covered allow became deny
    assert h.metric(drop.DROP_POLICY_DENY, INGRESS) == 2
    reasons = {e.drop_reason for e in h.events() if e.type == events.CILIUM_NOTIFY_DROP}
    assert reasons == {drop.DROP_POLICY_DENY}


def test_wildcards_identity_protocol_port(harness):
    h = harness
    h.endpoint(EP_A, POD_A, ID_A, egress=True)
    setup_ipcache(h)
    h.dp.set_policy(EP_A, [
        PolicyEntry("egress", identity=0, protocol=17, port=53),       # any identity, UDP 53
        PolicyEntry("egress", identity=ID_REMOTE, protocol=6),         # REMOTE, any TCP port
        PolicyEntry("egress", identity=ID_OTHER),                      # OTHER, anything
    ])
    assert h.egress(pk.udp(POD_A, 5000, OUTSIDE, 53)) == TC_ACT_OK           # world via wildcard identity
    assert h.egress(pk.udp(POD_A, 5001, OUTSIDE, 54)) == TC_ACT_SHOT
    assert h.egress(pk.tcp(POD_A, 5002, REMOTE, 12345)) == TC_ACT_OK
    assert h.egress(pk.udp(POD_A, 5003, REMOTE, 12345)) == TC_ACT_SHOT
    assert h.egress(pk.sctp(POD_A, 5004, "10.244.3.4", 9)) == TC_ACT_OK
    assert h.egress(pk.icmp(POD_A, "10.244.3.4")) == TC_ACT_OK
    assert h.egress(pk.icmp(POD_A, REMOTE)) == TC_ACT_SHOT


def test_port_ranges_and_any_protocol_ports(harness):
    h = harness
    h.endpoint(EP_B, POD_B, ID_B, ingress=True)
    setup_ipcache(h)
    h.dp.set_policy(EP_B, [PolicyEntry("ingress", identity=ID_REMOTE, protocol=6, port=8000, end_port=8100),
                           PolicyEntry("ingress", identity=ID_REMOTE, protocol=0, port=9000)])
    for port, expected in ((7999, TC_ACT_SHOT), (8000, TC_ACT_OK), (8063, TC_ACT_OK), (8064, TC_ACT_OK),
                           (8100, TC_ACT_OK), (8101, TC_ACT_SHOT)):
        assert h.ingress(pk.tcp(REMOTE, 20000 + port, POD_B, port)) == expected, port
    assert h.ingress(pk.udp(REMOTE, 1, POD_B, 8050)) == TC_ACT_SHOT
    assert h.ingress(pk.udp(REMOTE, 2, POD_B, 9000)) == TC_ACT_OK
    assert h.ingress(pk.tcp(REMOTE, 3, POD_B, 9000)) == TC_ACT_OK
    assert h.ingress(pk.sctp(REMOTE, 4, POD_B, 9000)) == TC_ACT_OK


def test_replies_pass_and_new_connections_stop_after_deny(harness):
    h = harness
    h.endpoint(EP_A, POD_A, ID_A, egress=True, ingress=True)
    setup_ipcache(h)
    h.dp.set_policy(EP_A, [PolicyEntry("egress", identity=ID_REMOTE, protocol=6, port=80)])
    assert h.egress(pk.tcp(POD_A, 41000, REMOTE, 80, pk.TCP_SYN)) == TC_ACT_OK
    # reply enters the pod although ingress is enforced with no ingress rule
    assert h.ingress(pk.tcp(REMOTE, 80, POD_A, 41000, pk.TCP_SYN | pk.TCP_ACK)) == TC_ACT_OK
    assert h.egress(pk.tcp(POD_A, 41000, REMOTE, 80, pk.TCP_ACK)) == TC_ACT_OK
    entry = [r for r in h.dp.conntrack() if r.dport == 80][0]
    assert entry.tx_packets == 2 and entry.rx_packets == 1
    assert entry.expires_in > conntrack.CT_SYN_TIMEOUT  # established: 8000 s

    # deny added later: established flow goes on, a new connection is dropped
    h.dp.set_policy(EP_A, [PolicyEntry("egress", identity=ID_REMOTE, protocol=6, port=80),
                           PolicyEntry("egress", identity=ID_REMOTE, protocol=6, port=80, deny=True)])
    assert h.egress(pk.tcp(POD_A, 41000, REMOTE, 80, pk.TCP_ACK | pk.TCP_PSH)) == TC_ACT_OK
    assert h.ingress(pk.tcp(REMOTE, 80, POD_A, 41000, pk.TCP_ACK)) == TC_ACT_OK
    assert h.egress(pk.tcp(POD_A, 41001, REMOTE, 80, pk.TCP_SYN)) == TC_ACT_SHOT
    # an unsolicited packet into the pod is not a reply
    assert h.ingress(pk.tcp(REMOTE, 81, POD_A, 41000, pk.TCP_ACK)) == TC_ACT_SHOT

    # one FIN (a half-close) keeps the lifetime, the peer's FIN shortens it (Cilium: both closed);
    # a new SYN on the closing tuple is decided again (and denied)
    assert h.egress(pk.tcp(POD_A, 41000, REMOTE, 80, pk.TCP_FIN | pk.TCP_ACK)) == TC_ACT_OK
    entry = [r for r in h.dp.conntrack() if r.dport == 80 and r.sport == 41000][0]
    assert entry.closing and entry.expires_in > conntrack.CT_SYN_TIMEOUT
    assert h.ingress(pk.tcp(REMOTE, 80, POD_A, 41000, pk.TCP_FIN | pk.TCP_ACK)) == TC_ACT_OK
    entry = [r for r in h.dp.conntrack() if r.dport == 80 and r.sport == 41000][0]
    assert entry.expires_in <= conntrack.CT_CLOSE_TIMEOUT
    assert h.egress(pk.tcp(POD_A, 41000, REMOTE, 80, pk.TCP_SYN)) == TC_ACT_SHOT


def test_udp_and_icmp_replies(harness):
    h = harness
    h.endpoint(EP_A, POD_A, ID_A, egress=True, ingress=True)
    setup_ipcache(h)
    h.dp.set_policy(EP_A, [PolicyEntry("egress", identity=ID_REMOTE, protocol=17, port=53),
                           PolicyEntry("egress", identity=ID_REMOTE, protocol=1, port=icmp_type_port(8))])
    assert h.egress(pk.udp(POD_A, 33000, REMOTE, 53)) == TC_ACT_OK
    assert h.ingress(pk.udp(REMOTE, 53, POD_A, 33000)) == TC_ACT_OK
    assert h.ingress(pk.udp(REMOTE, 53, POD_A, 33001)) == TC_ACT_SHOT
    assert h.egress(pk.icmp(POD_A, REMOTE, 8, ident=77)) == TC_ACT_OK
    assert h.ingress(pk.icmp(REMOTE, POD_A, 0, ident=77)) == TC_ACT_OK
    assert h.ingress(pk.icmp(REMOTE, POD_A, 0, ident=78)) == TC_ACT_SHOT
    row = [r for r in h.dp.conntrack() if r.protocol == 17][0]
    assert 0 < row.expires_in <= conntrack.CT_CONNECTION_LIFETIME_NONTCP


def test_unknown_source_is_world(harness):
    h = harness
    h.endpoint(EP_B, POD_B, ID_B, ingress=True)
    setup_ipcache(h)
    h.dp.set_policy(EP_B, [PolicyEntry("ingress", identity=2, protocol=6, port=443)])  # reserved:world
    assert h.ingress(pk.tcp(OUTSIDE, 1, POD_B, 443)) == TC_ACT_OK
    assert h.ingress(pk.tcp(REMOTE, 2, POD_B, 443)) == TC_ACT_SHOT  # known identity, not world
    ev = [e for e in h.events() if e.type == events.CILIUM_NOTIFY_POLICY_VERDICT][0]
    assert ev.src_identity == 2


def test_local_endpoint_identity_without_ipcache(harness):
    h = harness
    h.endpoint(EP_A, POD_A, ID_A)
    h.endpoint(EP_B, POD_B, ID_B, ingress=True)
    h.dp.set_policy(EP_B, [PolicyEntry("ingress", identity=ID_A, protocol=6, port=80)])
    assert h.egress(pk.tcp(POD_A, 1234, POD_B, 80)) == TC_ACT_OK
    assert h.ingress(pk.tcp(POD_A, 1234, POD_B, 80)) == TC_ACT_OK
    # reply from B: B's egress (not enforced) then A's ingress via CT
    assert h.egress(pk.tcp(POD_B, 80, POD_A, 1234, pk.TCP_SYN | pk.TCP_ACK)) == TC_ACT_OK
    assert h.ingress(pk.tcp(POD_B, 80, POD_A, 1234, pk.TCP_SYN | pk.TCP_ACK)) == TC_ACT_OK
    sides = sorted(r.side for r in h.dp.conntrack() if r.dport == 80)
    assert sides == [conntrack.CT_EGRESS, conntrack.CT_INGRESS]


def test_spoofing_fragments_ipv6_and_missing_policy_map(harness):
    h = harness
    h.endpoint(EP_A, POD_A, ID_A)
    assert h.egress(pk.tcp("10.244.1.99", 1, REMOTE, 80)) == TC_ACT_SHOT
    assert h.metric(drop.DROP_INVALID_SIP, EGRESS) == 1
    # a later fragment whose first fragment was never seen cannot be judged; after its first, it can
    assert h.egress(pk.udp_later_fragment(POD_A, REMOTE)) == TC_ACT_SHOT
    assert h.metric(drop.DROP_FRAG_NOT_FOUND, EGRESS) == 1
    assert h.egress(pk.udp_fragment(POD_A, 1, REMOTE, 53)) == TC_ACT_OK
    assert h.egress(pk.udp_later_fragment(POD_A, REMOTE)) == TC_ACT_OK
    assert h.egress(pk.ipv6_stub()) == TC_ACT_SHOT
    assert h.metric(drop.DROP_UNKNOWN_L3, EGRESS) == 1
    arp = pk.ethernet(b"\0" * 28, pk.ETH_P_ARP)
    assert h.egress(arp) == TC_ACT_OK
    # enforced endpoint whose policy map vanished: fail closed
    h.dp.set_enforcement(EP_A, ingress=False, egress=True)
    import ctypes

    from propolis.maps import policy
    h.dp._map(policy.OUTER_SPEC.pin_name).delete(ctypes.c_uint32(EP_A))
    assert h.egress(pk.tcp(POD_A, 2, REMOTE, 80)) == TC_ACT_SHOT
    assert h.metric(drop.DROP_NO_CONFIG, EGRESS) == 1


def test_monitor_aggregation(harness):
    h = harness
    from propolis.datapath import DatapathSettings
    h.endpoint(EP_A, POD_A, ID_A)
    try:
        h.dp.apply_settings(DatapathSettings(monitor_aggregation="maximum"))
        for _ in range(3):
            assert h.egress(pk.udp(POD_A, 7000, REMOTE, 7)) == TC_ACT_OK
        assert len([e for e in h.events() if e.type == events.CILIUM_NOTIFY_TRACE]) == 1
        h.dp.apply_settings(DatapathSettings(monitor_aggregation="none"))
        for _ in range(3):
            h.egress(pk.udp(POD_A, 7000, REMOTE, 7))
        assert len([e for e in h.events() if e.type == events.CILIUM_NOTIFY_TRACE]) == 3
    finally:
        h.dp.apply_settings(DatapathSettings())


def test_a_full_ring_counts_lost_events_and_never_blocks_the_packet(harness):
    """More trace events than the ring holds: every packet still passes, the overflow is counted
    as ring_full (Hubble's lost events) for the trace type, and what did fit is readable."""
    h = harness
    from propolis.datapath import DatapathSettings
    from propolis.maps import bpf
    h.endpoint(EP_A, POD_A, ID_A)
    runs = h.reader.size // (ctypes.sizeof(events.FlowEventRecord) + 8) + 1000  # record + ring header
    lost_before = h.reader.lost()
    try:
        h.dp.apply_settings(DatapathSettings(monitor_aggregation="none"))  # one trace per packet
        assert h.dp.programs is not None
        verdict, _, _ = bpf.prog_test_run(h.dp.programs.from_container_fd, pk.udp(POD_A, 7000, REMOTE, 7),
                                          repeat=runs)
        assert verdict == TC_ACT_OK
    finally:
        h.dp.apply_settings(DatapathSettings())
    lost = h.reader.lost() - lost_before
    kept = len([e for e in h.reader.read(limit=runs) if e.type == events.CILIUM_NOTIFY_TRACE])
    assert lost >= 1000 and kept > 0, (lost, kept)
    assert kept + lost == runs
    assert h.reader.lost_by_type()["trace"]["ring_full"] >= lost


def test_icmp_errors_about_tracked_flows_are_related(harness):
    h = harness
    h.endpoint(EP_A, POD_A, ID_A, egress=True, ingress=True)
    setup_ipcache(h)
    h.dp.set_policy(EP_A, [PolicyEntry("egress", identity=ID_REMOTE, protocol=17, port=53)])
    sent = pk.udp(POD_A, 33333, REMOTE, 53)
    assert h.egress(sent) == TC_ACT_OK
    h.events()
    assert h.ingress(pk.icmp_error(REMOTE, POD_A, sent)) == TC_ACT_OK
    traces = [e for e in h.events() if e.type == events.CILIUM_NOTIFY_TRACE]
    assert traces and traces[0].trace_reason == 4  # RELATED
    # an error about a flow nobody opened is just ICMP: policy decides (denied here)
    assert h.ingress(pk.icmp_error(REMOTE, POD_A, pk.udp(POD_A, 33334, REMOTE, 53))) == TC_ACT_SHOT


def test_set_policy_diffs_and_leaves_other_endpoints_alone(harness):
    h = harness
    h.endpoint(EP_A, POD_A, ID_A, ingress=True)
    h.endpoint(EP_B, POD_B, ID_B, ingress=True)
    entries = [PolicyEntry("ingress", identity=5000 + i, protocol=6, port=80) for i in range(1000)]
    import time
    started = time.perf_counter()
    first = h.dp.set_policy(EP_A, entries)
    full = time.perf_counter() - started
    assert (first.added, first.updated, first.deleted) == (1000, 0, 0)
    h.dp.set_policy(EP_B, [PolicyEntry("ingress", identity=7, protocol=17, port=53)])
    started = time.perf_counter()
    again = h.dp.set_policy(EP_A, entries[1:] + [PolicyEntry("ingress", identity=9999, protocol=6, port=443)])
    incremental = time.perf_counter() - started
    print(f"\n[bpf] set_policy 1000 rows: {full * 1000:.1f} ms; 1-row change on 1000: {incremental * 1000:.1f} ms")
    assert (again.added, again.updated, again.deleted) == (1, 0, 1)
    assert not h.dp.set_policy(EP_A, entries[1:] + [PolicyEntry("ingress", identity=9999, protocol=6, port=443)]).changed
    assert len(h.dp.get_policy(EP_B)) == 1


async def test_event_stream_is_async(harness):
    import asyncio
    h = harness
    h.endpoint(EP_A, POD_A, ID_A, egress=True)
    h.reader.read()
    stream = h.reader.stream()

    async def first_event():
        return await stream.__anext__()

    waiter = asyncio.ensure_future(first_event())
    await asyncio.sleep(0.05)
    assert not waiter.done()
    assert h.egress(pk.tcp(POD_A, 1, REMOTE, 80)) == TC_ACT_SHOT
    event = await asyncio.wait_for(waiter, 2)
    assert event.type in (events.CILIUM_NOTIFY_POLICY_VERDICT, events.CILIUM_NOTIFY_DROP)
    await stream.aclose()


def test_ct_gc_removes_only_expired_entries(harness):
    h = harness
    h.endpoint(EP_A, POD_A, ID_A)
    assert h.egress(pk.udp(POD_A, 1000, REMOTE, 53)) == TC_ACT_OK
    assert h.egress(pk.udp(POD_A, 1001, REMOTE, 53)) == TC_ACT_OK
    ct = h.dp._map(conntrack.ANY_SPEC.pin_name)
    key, value = next((k, v) for k, v in ct.items() if k.sport == socket.htons(1000))
    value.lifetime = conntrack.now_seconds() - 5
    ct.update(key, value)
    assert h.egress(pk.udp(POD_A, 1000, REMOTE, 53)) == TC_ACT_OK  # expired = new: recreated
    value.lifetime = conntrack.now_seconds() - 5
    ct.update(key, value)
    assert h.dp.ct_gc() == 1
    assert [r.sport for r in h.dp.conntrack()] == [1001]


def test_bad_endpoint_input_names_the_field(harness):
    from propolis.errors import PermanentError, ValidationError
    h = harness
    for kwargs, field in (({"endpoint_id": 0}, "endpoint_id"), ({"endpoint_id": 70000}, "endpoint_id"),
                          ({"ip": "10.0.0.300"}, "ip"), ({"identity": 0}, "identity")):
        args = {"endpoint_id": 5, "ip": "10.1.1.1", "identity": 300, "ifindex": 1, **kwargs}
        with pytest.raises(ValidationError) as err:
            h.dp.upsert_endpoint(**args)
        assert err.value.field == field
    h.endpoint(5, "10.1.1.1", 300)
    with pytest.raises(ValidationError, match="already belongs to endpoint 5"):
        h.dp.upsert_endpoint(endpoint_id=6, ip="10.1.1.1", identity=300, ifindex=1)
    with pytest.raises(PermanentError, match="endpoint 9"):
        h.dp.set_enforcement(9, ingress=True, egress=True)
    with pytest.raises(PermanentError, match="no policy map"):
        h.dp.set_policy(9, [])
    with pytest.raises(ValidationError):
        h.dp.set_ipcache([IPCacheEntry("not-an-ip", 5)])
