"""Service load-balancing in bpf_lxc / bpf_host on crafted packets (BPF_PROG_TEST_RUN):
DNAT, reverse NAT, stickiness, affinity, Maglev, terminating backends, no-backend drops,
hairpin, policy on the backend, NodePort, and the map diffing of Datapath.set_services."""

from __future__ import annotations

import ctypes
import socket
import struct
from collections import Counter
from collections.abc import Iterator

import pytest

from propolis.datapath import IPCacheEntry, PolicyEntry
from propolis.datapath import packets as pk
from propolis.lb import Backend, LBService
from propolis.maps import bpf, conntrack, drop, events
from propolis.maps import lb as lbmaps

pytestmark = pytest.mark.root

OK, SHOT = 0, 2
POD_A, POD_B, POD_C, REMOTE = "10.244.1.10", "10.244.1.20", "10.244.1.30", "10.244.2.40"
ID_A, ID_B, ID_C, ID_REMOTE = 2001, 2002, 2003, 2004
EP_A, EP_B, EP_C = 31, 32, 33
VIP = "10.96.0.10"
NODE_IP = "172.18.0.2"


# ------------------------------------------------------------------ packets with real checksums
def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _l4(src: str, dst: str, proto: int, segment: bytes, csum_at: int) -> bytes:
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto, len(segment))
    value = _csum(pseudo + segment) or 0xFFFF
    return segment[:csum_at] + struct.pack("!H", value) + segment[csum_at + 2:]


def tcp(src: str, sport: int, dst: str, dport: int, flags: int = pk.TCP_SYN) -> bytes:
    seg = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) + b"data"
    return pk.ethernet(pk.ipv4(src, dst, 6, _l4(src, dst, 6, seg, 16)))


def udp(src: str, sport: int, dst: str, dport: int) -> bytes:
    seg = struct.pack("!HHHH", sport, dport, 8 + 6, 0) + b"dnsreq"
    return pk.ethernet(pk.ipv4(src, dst, 17, _l4(src, dst, 17, seg, 6)))


def fields(frame: bytes) -> tuple[str, int, str, int]:
    """(src, sport, dst, dport) of a frame, after checking its IP and L4 checksums."""
    ip = frame[14:34]
    assert _csum(ip) == 0, "IPv4 header checksum broken"
    proto = ip[9]
    src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
    seg = frame[34:]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, proto, len(seg))
    assert _csum(pseudo + seg) == 0, "L4 checksum broken"
    sport, dport = struct.unpack("!HH", seg[:4])
    return src, sport, dst, dport


# ------------------------------------------------------------------ fixture
@pytest.fixture
def lb(harness) -> Iterator[LbHarness]:
    h = LbHarness(harness)
    h.clear()
    try:
        yield h
    finally:
        h.clear()
        h.h.dp.settings.kube_proxy_replacement = True
        h.h.dp.settings.lb_algorithm = "random"


class LbHarness:
    def __init__(self, harness) -> None:
        self.h = harness
        self.dp = harness.dp

    def clear(self) -> None:
        for spec in (*lbmaps.SPECS, *lbmaps.NETDEV_SPECS):
            self.dp._map(spec.pin_name).clear()
        self.dp._services = None

    def pods(self, *, egress_enforced: bool = False) -> None:
        self.h.endpoint(EP_A, POD_A, ID_A, egress=egress_enforced)
        self.h.endpoint(EP_B, POD_B, ID_B)
        self.h.endpoint(EP_C, POD_C, ID_C)
        self.dp.set_ipcache([IPCacheEntry(POD_A, ID_A), IPCacheEntry(POD_B, ID_B), IPCacheEntry(POD_C, ID_C),
                             IPCacheEntry(REMOTE, ID_REMOTE)])

    def egress(self, frame: bytes) -> tuple[int, bytes]:
        ret, _, out = bpf.prog_test_run(self.dp.programs.from_container_fd, frame)
        return ret, out

    def ingress(self, frame: bytes) -> tuple[int, bytes]:
        ret, _, out = bpf.prog_test_run(self.dp.programs.to_container_fd, frame)
        return ret, out

    def netdev(self, frame: bytes) -> tuple[int, bytes]:
        ret, _, out = bpf.prog_test_run(self.dp.programs.from_netdev_fd, frame)
        return ret, out


def service(*backends: Backend, port: int = 80, protocol: str = "TCP", ip: str = VIP, ftype: str = "ClusterIP",
            affinity: int = 0, name: str = "web") -> LBService:
    return LBService("default", name, "http", ftype, ip, port, protocol, tuple(backends),
                     session_affinity=affinity > 0, affinity_timeout=affinity)


B8080 = Backend(POD_B, 8080)
C8080 = Backend(POD_C, 8080)


# ------------------------------------------------------------------ tests
def test_clusterip_tcp_dnat_sticks_and_reverse_nats(lb):
    lb.pods()
    lb.dp.set_services([service(B8080, C8080)])
    ret, out = lb.egress(tcp(POD_A, 40000, VIP, 80))
    assert ret == OK
    src, sport, backend, bport = fields(out)
    assert (src, sport, bport) == (POD_A, 40000, 8080) and backend in (POD_B, POD_C)
    # every later packet of the flow goes to the same backend
    for _ in range(20):
        ret, out = lb.egress(tcp(POD_A, 40000, VIP, 80, pk.TCP_ACK))
        assert ret == OK and fields(out)[2:] == (backend, 8080)
    # the reply gets the service address back
    ret, out = lb.ingress(tcp(backend, 8080, POD_A, 40000, pk.TCP_SYN | pk.TCP_ACK))
    assert ret == OK and fields(out) == (VIP, 80, POD_A, 40000)
    rows = lb.dp.conntrack()
    assert [r for r in rows if r.side == conntrack.CT_SERVICE and r.dst == VIP and r.dport == 80]
    tracked = [r for r in rows if r.side == conntrack.CT_EGRESS and r.dst == backend]
    assert tracked and tracked[0].dst_identity == (ID_B if backend == POD_B else ID_C)


def test_new_connections_reach_every_backend(lb):
    lb.pods()
    lb.dp.set_services([service(B8080, C8080)])
    seen = Counter(fields(lb.egress(tcp(POD_A, 41000 + i, VIP, 80))[1])[2] for i in range(200))
    assert set(seen) == {POD_B, POD_C} and min(seen.values()) > 50


def test_udp_and_several_ports(lb):
    lb.pods()
    lb.dp.set_services([service(Backend(POD_B, 5353, "UDP"), port=53, protocol="UDP"),
                        service(Backend(POD_B, 9090), port=9090)])
    ret, out = lb.egress(udp(POD_A, 5000, VIP, 53))
    assert ret == OK and fields(out) == (POD_A, 5000, POD_B, 5353)
    ret, out = lb.ingress(udp(POD_B, 5353, POD_A, 5000))
    assert ret == OK and fields(out) == (VIP, 53, POD_A, 5000)
    ret, out = lb.egress(tcp(POD_A, 5001, VIP, 9090))
    assert ret == OK and fields(out)[2:] == (POD_B, 9090)
    # a port the service does not have is not translated
    ret, out = lb.egress(tcp(POD_A, 5002, VIP, 81))
    assert ret == OK and fields(out)[2:] == (VIP, 81)


def test_no_backend_drops_with_cilium_reason(lb):
    lb.pods()
    lb.h.events()
    lb.dp.set_services([service()])
    ret, _ = lb.egress(tcp(POD_A, 40100, VIP, 80))
    assert ret == SHOT
    drops = [e for e in lb.h.events() if e.type == events.CILIUM_NOTIFY_DROP]
    assert drops and drops[0].drop_reason == 158
    assert drop.reason_text(158) == "Service backend not found"
    assert lb.h.metric(158, 2) == 1


def test_terminating_backend_keeps_established_flow_only(lb):
    lb.pods()
    lb.dp.set_services([service(B8080)])
    assert fields(lb.egress(tcp(POD_A, 40200, VIP, 80))[1])[2] == POD_B
    lb.dp.set_services([service(Backend(POD_B, 8080, state="terminating"), C8080)])
    for _ in range(5):  # the established flow stays on the terminating backend
        assert fields(lb.egress(tcp(POD_A, 40200, VIP, 80, pk.TCP_ACK))[1])[2] == POD_B
    new = {fields(lb.egress(tcp(POD_A, 40300 + i, VIP, 80))[1])[2] for i in range(40)}
    assert new == {POD_C}
    # the backend gone for good: its flows pick again among the active ones
    lb.dp.set_services([service(C8080)])
    assert fields(lb.egress(tcp(POD_A, 40200, VIP, 80, pk.TCP_ACK))[1])[2] == POD_C
    # only terminating backends left: no new connections
    lb.dp.set_services([service(Backend(POD_C, 8080, state="terminating"))])
    assert lb.egress(tcp(POD_A, 40400, VIP, 80))[0] == SHOT


def test_session_affinity_client_ip(lb):
    lb.pods()
    lb.h.endpoint(34, "10.244.1.40", 2005)
    lb.dp.set_services([service(B8080, C8080, affinity=60)])
    first = {fields(lb.egress(tcp(POD_A, 42000 + i, VIP, 80))[1])[2] for i in range(30)}
    assert len(first) == 1
    other = {fields(lb.egress(tcp("10.244.1.40", 42000 + i, VIP, 80))[1])[2] for i in range(30)}
    assert len(other) == 1
    rows = lbmaps.items_batch(lb.dp._map(lbmaps.AFFINITY_SPEC.pin_name))
    assert len(rows) == 2
    # an expired affinity is not honoured: age it past the timeout
    aff = lb.dp._map(lbmaps.AFFINITY_SPEC.pin_name)
    seen: set[str] = set()
    for attempt in range(40):
        for key, value in lbmaps.items_batch(aff):
            value.last_used = max(0, conntrack.now_seconds() - 120)
            aff.update(key, value)
        seen.add(fields(lb.egress(tcp(POD_A, 43000 + attempt, VIP, 80))[1])[2])
    assert seen == {POD_B, POD_C}


def test_maglev_is_consistent(lb):
    lb.pods()
    lb.dp.settings.lb_algorithm = "maglev"
    lb.dp.set_services([service(B8080, C8080)])
    master = lb.dp._map(lbmaps.SERVICES_SPEC.pin_name).lookup(lbmaps.service_key(VIP, 80, 6))
    assert master.flags2 & lbmaps.SVC_FLAG2_MAGLEV
    first = [fields(lb.egress(tcp(POD_A, 44000 + i, VIP, 80))[1])[2] for i in range(100)]
    assert set(first) == {POD_B, POD_C}
    for spec in (conntrack.TCP_SPEC, conntrack.ANY_SPEC):  # forget every flow: the hash decides again
        lb.dp._map(spec.pin_name).clear()
    again = [fields(lb.egress(tcp(POD_A, 44000 + i, VIP, 80))[1])[2] for i in range(100)]
    assert again == first


def test_policy_is_decided_on_the_backend(lb):
    lb.pods(egress_enforced=True)
    lb.dp.set_policy(EP_A, [PolicyEntry("egress", identity=ID_B, protocol=6, port=8080)])
    lb.dp.set_services([service(B8080), service(C8080, ip="10.96.0.11")])
    assert lb.egress(tcp(POD_A, 45000, VIP, 80))[0] == OK
    lb.h.events()
    assert lb.egress(tcp(POD_A, 45001, "10.96.0.11", 80))[0] == SHOT
    drops = [e for e in lb.h.events() if e.type == events.CILIUM_NOTIFY_DROP]
    assert drops[0].drop_reason == drop.DROP_POLICY and drops[0].dst_ip == POD_C
    assert drops[0].dst_identity == ID_C


def test_hairpin(lb):
    lb.pods()
    lb.dp.set_services([service(Backend(POD_A, 8080))])
    ret, out = lb.egress(tcp(POD_A, 46000, VIP, 80))
    assert ret == OK and fields(out) == (lbmaps.HAIRPIN_IP, 46000, POD_A, 8080)
    ret, out = lb.egress(tcp(POD_A, 8080, lbmaps.HAIRPIN_IP, 46000, pk.TCP_SYN | pk.TCP_ACK))
    assert ret == OK and fields(out) == (VIP, 80, POD_A, 46000)


def test_nodeport_to_local_backend(lb):
    lb.pods()
    lb.dp.set_services([service(B8080, ip=NODE_IP, port=30080, ftype="NodePort")])
    ret, out = lb.netdev(tcp("172.18.0.9", 50000, NODE_IP, 30080))
    assert ret == OK and fields(out) == ("172.18.0.9", 50000, POD_B, 8080)
    # a ClusterIP-only frontend is not reachable from outside through cil_from_netdev
    lb.dp.set_services([service(B8080)])
    ret, out = lb.netdev(tcp("172.18.0.9", 50001, VIP, 80))
    assert ret == OK and fields(out)[2:] == (VIP, 80)


def test_set_services_diffs_recovers_and_cleans(lb):
    lb.pods()
    web = service(B8080, C8080)
    dns = service(Backend(POD_B, 53, "UDP"), port=53, protocol="UDP", name="dns")
    first = lb.dp.set_services([web, dns])
    assert first.frontends_added == 2 and first.entries_written == 3 + 2 + 5  # backends, rev NAT, masters+slots
    assert lb.dp.set_services([web, dns]).entries_written == 0
    lb.dp._services.forget()  # as after a restart: read back, nothing to write
    again = lb.dp.set_services([web, dns])
    assert (again.entries_written, again.entries_deleted) == (0, 0)
    views = {v.frontend: v for v in lb.dp.list_services()}
    assert [b.address for b in views[f"{VIP}:80"].backends] == [f"{POD_B}:8080", f"{POD_C}:8080"]
    gone = lb.dp.set_services([dns])
    assert gone.frontends_removed == 1
    assert len(lbmaps.items_batch(lb.dp._map(lbmaps.SERVICES_SPEC.pin_name))) == 2
    assert len(lbmaps.items_batch(lb.dp._map(lbmaps.REV_NAT_SPEC.pin_name))) == 1
    assert len(lbmaps.items_batch(lb.dp._map(lbmaps.BACKENDS_SPEC.pin_name))) == 1
    lb.dp.set_services([])
    for spec in lbmaps.SPECS:
        assert not lbmaps.items_batch(lb.dp._map(spec.pin_name)), spec.pin_name


def test_kube_proxy_replacement_off_leaves_services_alone(lb):
    lb.pods()
    lb.dp.set_services([service(B8080)])
    lb.dp.settings.kube_proxy_replacement = False
    diff = lb.dp.set_services([service(B8080)])
    assert not diff.enabled and diff.frontends == 0
    ret, out = lb.egress(tcp(POD_A, 47000, VIP, 80))
    assert ret == OK and fields(out)[2:] == (VIP, 80)


def test_snat_map_layout_matches_bcc(loaded_datapath):
    from test_layouts import same
    table = loaded_datapath.programs.table(lbmaps.SNAT_SPEC.c_name)
    same(lbmaps.SNAT_SPEC.key_type, table.Key)
    same(lbmaps.SNAT_SPEC.value_type, table.Leaf)
    assert ctypes.sizeof(lbmaps.Lb4Maglev) == 4 * lbmaps.MAGLEV_TABLE_SIZE


def test_update_services_touches_only_the_named_frontends(lb):
    lb.pods()
    web, api = service(B8080, C8080), service(B8080, ip="10.96.0.11", name="api")
    lb.dp.set_services([web, api])
    # api loses B (shared with web: the backend entry must stay), gets C
    diff = lb.dp.update_services([service(C8080, ip="10.96.0.11", name="api")])
    # the slot, and C's backend entry (rewritten as is: the subset does not know web wrote it)
    assert diff.frontends == 2 and diff.entries_deleted == 0 and diff.entries_written == 2
    backends = lbmaps.dump_backends(lb.dp._map(lbmaps.BACKENDS_SPEC.pin_name))
    assert sorted(b[0] for b in backends.values()) == [POD_B, POD_C]
    assert fields(lb.egress(tcp(POD_A, 48000, "10.96.0.11", 80))[1])[2] == POD_C
    # web removed: B is used by nobody now and goes; C stays for api
    diff = lb.dp.update_services([], removed=[(VIP, 80, "TCP")])
    assert diff.frontends_removed == 1
    backends = lbmaps.dump_backends(lb.dp._map(lbmaps.BACKENDS_SPEC.pin_name))
    assert [b[0] for b in backends.values()] == [POD_C]
    assert lb.egress(tcp(POD_A, 48001, VIP, 80))[1][30:34] == socket.inet_aton(VIP)  # not translated
    # a full sync afterwards agrees with the incremental state: nothing to write
    again = lb.dp.set_services([service(C8080, ip="10.96.0.11", name="api")])
    assert (again.entries_written, again.entries_deleted) == (0, 0)
