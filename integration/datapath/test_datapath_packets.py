"""bpf_lxc with real packets between pod namespaces through a node namespace."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time

import pytest
from datapath_topology import Node, sh, tcp_probe, udp_probe
from pyroute2.netns import create_socket

from propolis.datapath import Datapath, IPCacheEntry, PolicyEntry
from propolis.maps import events
from propolis.maps.drop import DROP_POLICY, DROP_POLICY_DENY

pytestmark = pytest.mark.root

EGRESS, INGRESS = 2, 1


def reset_policy(node: Node) -> None:
    assert node.dp is not None
    for pod in node.pods.values():
        node.dp.set_enforcement(pod.endpoint_id, ingress=False, egress=False)
        node.dp.set_policy(pod.endpoint_id, [])


def metric(node: Node, reason: int, direction: int) -> int:
    assert node.dp is not None
    return sum(r.packets for r in node.dp.metrics() if r.reason == reason and r.direction == direction)


def test_tcp_and_udp_allowed_then_denied_by_map_changes(node):
    dp, a, b, c = node.dp, node.pods["a"], node.pods["b"], node.pods["c"]
    reset_policy(node)
    reader = dp.events()
    try:
        reader.read()
        # nothing enforced: everything flows
        assert tcp_probe(a, b.ip, 8080)
        assert udp_probe(a, b.ip, 5353)
        # b enforces ingress: only a on TCP 8080
        dp.set_policy(b.endpoint_id, [PolicyEntry("ingress", identity=a.identity, protocol=6, port=8080)])
        dp.set_enforcement(b.endpoint_id, ingress=True, egress=False)
        assert tcp_probe(a, b.ip, 8080)
        before = metric(node, DROP_POLICY, INGRESS)
        assert not tcp_probe(a, b.ip, 8081)
        assert not udp_probe(a, b.ip, 5353)
        assert not tcp_probe(c, b.ip, 8080)
        assert metric(node, DROP_POLICY, INGRESS) > before
        # UDP allowed by a port range covering 5353
        dp.set_policy(b.endpoint_id, [PolicyEntry("ingress", identity=a.identity, protocol=6, port=8080),
                                      PolicyEntry("ingress", identity=0, protocol=17, port=5000, end_port=6000)])
        assert udp_probe(a, b.ip, 5353) and udp_probe(c, b.ip, 5353)
        # deny from a on everything beats the allows
        dp.set_policy(b.endpoint_id, [PolicyEntry("ingress", identity=a.identity, protocol=6, port=8080),
                                      PolicyEntry("ingress", identity=0, protocol=17, port=5000, end_port=6000),
                                      PolicyEntry("ingress", identity=a.identity, deny=True)])
        assert not tcp_probe(a, b.ip, 8080)
        assert not udp_probe(a, b.ip, 5353)
        assert udp_probe(c, b.ip, 5353)
        assert metric(node, DROP_POLICY_DENY, INGRESS) >= 2
        # egress of a: enforced with nothing allowed, dropped at a's own veth
        reset_policy(node)
        dp.set_enforcement(a.endpoint_id, ingress=False, egress=True)
        before = metric(node, DROP_POLICY, EGRESS)
        assert not tcp_probe(a, b.ip, 8080)
        assert metric(node, DROP_POLICY, EGRESS) > before
        dp.set_policy(a.endpoint_id, [PolicyEntry("egress", identity=b.identity, protocol=6, port=8080)])
        assert tcp_probe(a, b.ip, 8080)

        seen = reader.read()
        drops = [e for e in seen if e.type == events.CILIUM_NOTIFY_DROP]
        assert any(e.src_ip == a.ip and e.dst_ip == b.ip and e.dst_port == 8081 and e.protocol == 6
                   and e.src_identity == a.identity and e.dst_identity == b.identity
                   and e.drop_reason == DROP_POLICY and e.endpoint_id == b.endpoint_id
                   and e.direction == INGRESS and "SYN" in e.tcp_flag_names for e in drops)
        verdicts = [e for e in seen if e.type == events.CILIUM_NOTIFY_POLICY_VERDICT and e.verdict == 1]
        assert any(e.dst_port == 8080 and e.endpoint_id == b.endpoint_id for e in verdicts)
        traces = [e for e in seen if e.type == events.CILIUM_NOTIFY_TRACE and e.trace_reason == 1]
        assert traces, "new flows produce FORWARDED trace events"
    finally:
        reader.close()
        reset_policy(node)


def test_established_tcp_survives_reload_and_denied_stays_denied(node):
    """Restart the loader (new process state, same pins) under traffic: fail closed, no break."""
    dp, a, b, c = node.dp, node.pods["a"], node.pods["b"], node.pods["c"]
    reset_policy(node)
    dp.set_policy(b.endpoint_id, [PolicyEntry("ingress", identity=a.identity, protocol=6, port=9000)])
    dp.set_enforcement(b.endpoint_id, ingress=True, egress=False)

    stream = create_socket(a.netns, socket.AF_INET, socket.SOCK_STREAM, flags=0)
    stream.settimeout(2)
    stream.connect((b.ip, 9000))
    # once the connection is established, a deny added later must not cut it
    dp.set_policy(b.endpoint_id, [PolicyEntry("ingress", identity=a.identity, protocol=6, port=9000),
                                  PolicyEntry("ingress", identity=a.identity, protocol=6, port=9000, deny=True)])
    stop = threading.Event()
    stream_errors: list[str] = []
    leaked: list[int] = []
    exchanges = [0]

    def keep_streaming() -> None:
        while not stop.is_set():
            try:
                stream.sendall(b"tick")
                if stream.recv(16) != b"tick":
                    stream_errors.append("bad echo")
                exchanges[0] += 1
            except OSError as exc:
                stream_errors.append(repr(exc))
                return
            time.sleep(0.05)

    def probe_denied() -> None:
        while not stop.is_set():
            if tcp_probe(c, b.ip, 9000, timeout=0.3):
                leaked.append(1)

    threads = [threading.Thread(target=keep_streaming), threading.Thread(target=probe_denied)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        # "restart": the old writer goes away (programs stay attached, maps pinned) ...
        asyncio.run(dp.close())
        # ... a new one adopts the pins, recompiles, and re-attaches every endpoint
        fresh = Datapath(dp.node, dp.pin_dir, netns=node.netns)
        asyncio.run(fresh.load())  # the async path the writer uses (compile in a thread)
        assert fresh.programs is not None and not fresh.programs.compiled  # same build: pinned programs adopted
        print(f"\n[datapath] restart: programs adopted from pins in {fresh.compile_seconds * 1000:.1f} ms")
        reattached = asyncio.run(_reattach(fresh))
        node.dp = fresh
        assert reattached == len(node.pods)
        assert {e.endpoint_id for e in fresh.list_endpoints()} == {p.endpoint_id for p in node.pods.values()}
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        stream.close()
    assert not stream_errors, stream_errors
    assert exchanges[0] >= 5
    assert not leaked, "a denied connection got through during the restart"
    assert not tcp_probe(a, b.ip, 9000), "new connections from a are denied by the later deny rule"
    reset_policy(node)


async def _reattach(dp: Datapath) -> int:
    try:
        return await dp.reattach_all()
    finally:
        await dp._tc.close()


def test_attach_is_idempotent_and_detach_removes_everything(node):
    dp, b, c = node.dp, node.pods["b"], node.pods["c"]
    reset_policy(node)
    dp.set_enforcement(c.endpoint_id, ingress=False, egress=True)  # c may send nothing

    async def scenario() -> None:
        try:
            await dp.attach_endpoint(endpoint_id=c.endpoint_id, ip=c.ip, identity=c.identity, ifindex=c.ifindex)
            entry = [e for e in dp.list_endpoints() if e.endpoint_id == c.endpoint_id][0]
            assert entry.egress_enforced and not entry.ingress_enforced  # kept across re-attach
            assert not tcp_probe(c, b.ip, 8080)
            await dp.detach_endpoint(c.endpoint_id)
            await dp.detach_endpoint(c.endpoint_id)  # already gone: fine
            assert c.endpoint_id not in {e.endpoint_id for e in dp.list_endpoints()}
            assert not os.path.exists(os.path.join(dp.pin_dir, f"cilium_policy_v2_{c.endpoint_id:05d}"))
            assert "clsact" not in sh("ip", "netns", "exec", node.netns, "tc", "qdisc", "show", "dev", c.lxc)
            assert tcp_probe(c, b.ip, 8080)  # no program: plain routing
            result = await dp.attach_endpoint(endpoint_id=c.endpoint_id, ip=c.ip, identity=c.identity,
                                              ifname=c.lxc, ingress_enforced=False, egress_enforced=False)
            assert result.created_policy_map
            filters = await dp._tc.filters(node.netns, c.ifindex)
            assert {(f.parent, f.name) for f in filters} == {("ingress", "cil_from_container"),
                                                             ("egress", "cil_to_container")}
        finally:
            await dp._tc.close()

    asyncio.run(scenario())
    assert tcp_probe(c, b.ip, 8080)


def test_traffic_from_and_to_another_node_uses_ipcache_identities(node):
    """Routed (cross-node-like) packets: b's ingress sees r's identity from the ipcache; a's egress
    sees r's identity as destination; an address not in the ipcache is world."""
    dp, a, b, r = node.dp, node.pods["a"], node.pods["b"], node.remotes["r"]
    reset_policy(node)
    reader = dp.events()
    try:
        reader.read()
        dp.set_enforcement(b.endpoint_id, ingress=True, egress=False)
        assert not tcp_probe(r, b.ip, 8080)
        dp.set_policy(b.endpoint_id, [PolicyEntry("ingress", identity=r.identity, protocol=6, port=8080)])
        assert tcp_probe(r, b.ip, 8080)
        assert not tcp_probe(r, b.ip, 8081)
        dp.set_enforcement(a.endpoint_id, ingress=False, egress=True)
        assert not tcp_probe(a, r.ip, 7000)
        dp.set_policy(a.endpoint_id, [PolicyEntry("egress", identity=r.identity, protocol=6, port=7000)])
        assert tcp_probe(a, r.ip, 7000)
        # r's address leaves the ipcache: it is world now, and a rule for world lets it in again
        dp.delete_ipcache([r.ip])
        assert not tcp_probe(r, b.ip, 8080)
        dp.set_policy(b.endpoint_id, [PolicyEntry("ingress", identity=2, protocol=6, port=8080)])
        assert tcp_probe(r, b.ip, 8080)
        seen = reader.read()
        into_b = [e for e in seen if e.type == events.CILIUM_NOTIFY_POLICY_VERDICT and e.endpoint_id == b.endpoint_id]
        assert {e.src_identity for e in into_b} == {r.identity, 2}
        out_of_a = [e for e in seen if e.type == events.CILIUM_NOTIFY_POLICY_VERDICT and e.endpoint_id == a.endpoint_id]
        assert {e.dst_identity for e in out_of_a} == {r.identity}
    finally:
        reader.close()
        dp.upsert_ipcache([IPCacheEntry(r.ip, r.identity)])
        reset_policy(node)


def test_cleanup_leaves_no_pins_qdiscs_or_namespaces(node):
    from datapath_topology import teardown
    pin_dir = node.dp.pin_dir
    lxcs = [p.lxc for p in node.pods.values()]
    assert "clsact" in sh("ip", "netns", "exec", node.netns, "tc", "qdisc", "show", "dev", lxcs[0])
    asyncio.run(node.dp.remove_all())
    assert not os.path.exists(pin_dir)
    for lxc in lxcs:
        assert "clsact" not in sh("ip", "netns", "exec", node.netns, "tc", "qdisc", "show", "dev", lxc)
    # no filter left means traffic is plain routing again
    assert tcp_probe(node.pods["c"], node.pods["b"].ip, 9000)
    namespaces = node.all_netns()
    node.dp = None
    teardown(node)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in namespaces)
