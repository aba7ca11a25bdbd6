"""Datapath events become flows with Hubble's field names, enriched from the bus's state."""

from __future__ import annotations

import re

from hubble_helpers import A_IP, B_IP, SVC_IP, WORLD_IP, flow, make_event

from propolis.hubble.flow import Enricher, rfc3339, to_flow, workload_of
from propolis.maps import events as ev


def test_forwarded_tcp_flow_has_hubble_fields_and_enrichment():
    f = flow()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", f["time"])
    assert f["verdict"] == "FORWARDED" and f["Type"] == "L3_L4" and f["node_name"] == "n2"
    assert f["IP"] == {"source": A_IP, "destination": B_IP, "ipVersion": "IPv4"}
    assert f["l4"] == {"TCP": {"source_port": 43210, "destination_port": 8080, "flags": {"SYN": True}}}
    assert f["source"]["namespace"] == "shop" and f["source"]["pod_name"] == "frontend-7d4b9c6f5d-x2x9q"
    assert f["source"]["identity"] == 40001 and "k8s:app=frontend" in f["source"]["labels"]
    assert f["source"]["workloads"] == [{"name": "frontend", "kind": "Deployment"}]
    assert f["destination"]["workloads"] == [{"name": "backend", "kind": "StatefulSet"}]
    assert f["destination"]["ID"] == 102 and "ID" not in f["source"]  # ingress: the endpoint is the destination
    assert f["traffic_direction"] == "INGRESS" and f["is_reply"] is False
    assert f["event_type"] == {"type": 4, "sub_type": 0}
    assert f["trace_observation_point"] == "TO_ENDPOINT" and f["trace_reason"] == "NEW"
    assert f["destination_service"] == {"name": "backend", "namespace": "shop"}
    assert f["Summary"] == "TCP Flags: SYN"


def test_drop_has_reason_desc_and_world_is_reserved():
    f = flow(type=ev.CILIUM_NOTIFY_DROP, subtype=133, verdict=2, drop_reason=133, src_ip=WORLD_IP,
             src_identity=2, tcp_flags=0x12)
    assert f["verdict"] == "DROPPED" and f["drop_reason_desc"] == "POLICY_DENIED" and f["drop_reason"] == 133
    assert f["source"]["labels"] == ["reserved:world"] and "pod_name" not in f["source"]
    assert f["Summary"] == "TCP Flags: SYN, ACK"


def test_udp_icmp_reply_and_service_frontend():
    u = flow(protocol=17, dst_ip=SVC_IP, dst_port=80, direction=2, flags=ev.FLOW_EVENT_F_IS_REPLY)
    assert u["l4"] == {"UDP": {"source_port": 43210, "destination_port": 80}} and u["Summary"] == "UDP"
    assert u["is_reply"] is True and u["traffic_direction"] == "EGRESS" and u["source"]["ID"] == 102
    assert u["destination_service"] == {"name": "backend", "namespace": "shop"}
    i = flow(protocol=1, src_port=0, dst_port=0, icmp_type=8)
    assert i["l4"] == {"ICMPv4": {"type": 8, "code": 0}} and i["Summary"] == "ICMPv4 EchoRequest"


def test_policy_verdict_and_unknown_identity_from_identity_labels():
    f = flow(type=ev.CILIUM_NOTIFY_POLICY_VERDICT, match_type=2, verdict=2, drop_reason=133, src_ip="10.244.9.9")
    assert f["policy_match_type"] == 2 and f["drop_reason_desc"] == "POLICY_DENIED"
    assert f["source"]["namespace"] == "shop" and "pod_name" not in f["source"]  # from identity labels only
    bare = to_flow(make_event(), node="n1", enricher=Enricher())
    assert bare["source"] == {"identity": 40001}


def test_enricher_forgets_deleted_state(enricher):
    enricher.identities_event("endpoints.shop.backend-0", None)
    enricher.k8s_event("endpointslices.shop.backend-abc", None)
    f = to_flow(make_event(), node="n2", enricher=enricher)
    assert "pod_name" not in f["destination"] and "destination_service" not in f


def test_workload_guess_and_rfc3339():
    assert workload_of("web-5d8f7b9c4-abcde") == {"name": "web", "kind": "Deployment"}
    assert workload_of("db-2") == {"name": "db", "kind": "StatefulSet"}
    assert workload_of("agent-x7k2p") == {"name": "agent", "kind": "DaemonSet"}
    assert workload_of("client") == {"name": "client", "kind": "Pod"}
    assert rfc3339(0.5) == "1970-01-01T00:00:00.500000000Z"
    assert rfc3339(1.9999999999) == "1970-01-01T00:00:02.000000000Z"


def test_non_ipv4_frames_have_no_ip_or_l4():
    f = flow(type=ev.CILIUM_NOTIFY_DROP, subtype=139, verdict=2, drop_reason=139, src_ip="0.0.0.0",
             dst_ip="0.0.0.0", src_port=0, dst_port=0)
    assert f["IP"] == {} and f["l4"] == {} and f["drop_reason_desc"] == "UNSUPPORTED_L3_PROTOCOL"
    assert f["Summary"] == "not IPv4"


def test_ipcache_fills_an_identity_the_datapath_did_not_know(enricher):
    from propolis.bus.messages import IpcacheEntry
    enricher.ipcache_event("n9.10.9.9.9", IpcacheEntry("10.9.9.9", 32, 40002, "n9"))
    f = to_flow(make_event(src_ip="10.9.9.9", src_identity=0), node="n2", enricher=enricher)
    assert f["source"]["identity"] == 40002 and f["source"]["namespace"] == "shop"
    enricher.ipcache_event("n9.10.9.9.9", None)
    assert to_flow(make_event(src_ip="10.9.9.9", src_identity=0), node="n2", enricher=enricher)["source"] == \
        {"identity": 0}
