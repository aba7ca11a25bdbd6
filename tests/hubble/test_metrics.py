"""Hubble's metric names, labels and `hubble.metrics.enabled` syntax."""

from __future__ import annotations

import prometheus_client as prom
import pytest
from hubble_helpers import WORLD_IP, flow

from propolis.errors import ValidationError
from propolis.hubble.metrics import FlowMetrics, parse_enabled
from propolis.maps import events as ev

ALL = "{dns,drop,tcp,flow,icmp,http,port-distribution,policy}"


def test_parse_forms():
    assert [s.name for s in parse_enabled(ALL)] == ["dns", "drop", "tcp", "flow", "icmp", "http",
                                                    "port-distribution", "policy"]
    specs = parse_enabled("flow:sourceContext=namespace;destinationContext=pod|ip "
                          "drop:labelsContext=source_namespace,destination_namespace")
    assert specs[0].options == {"sourceContext": ["namespace"], "destinationContext": ["pod", "ip"]}
    assert specs[1].options == {"labelsContext": ["source_namespace", "destination_namespace"]}
    assert parse_enabled("{flow:sourceContext=workload,drop:labelsContext=source_pod,destination_pod}")[1].options \
        == {"labelsContext": ["source_pod", "destination_pod"]}
    assert [s.name for s in parse_enabled(["flow", "tcp"])] == ["flow", "tcp"]
    for bad in ("bogus", "flow:sourceContext=nothing", "flow:frobnicate=1", "flow flow", "drop:labelsContext=x"):
        with pytest.raises(ValidationError):
            parse_enabled(bad)


def value(reg, name, **labels):
    return reg.get_sample_value(name, labels) or 0.0


def test_counters_move_with_hubble_labels():
    reg = prom.CollectorRegistry()
    m = FlowMetrics(reg, ALL)
    m.process(flow())  # SYN, trace to-endpoint
    m.process(flow(tcp_flags=0x12, flags=1))  # SYN-ACK reply
    m.process(flow(type=ev.CILIUM_NOTIFY_DROP, subtype=133, verdict=2, drop_reason=133, tcp_flags=0x02))
    m.process(flow(type=ev.CILIUM_NOTIFY_POLICY_VERDICT, match_type=2, verdict=1, direction=1))
    m.process(flow(protocol=1, src_port=0, dst_port=0, icmp_type=8))
    m.count_lost("PERF_EVENT_RING_BUFFER", 3)
    assert value(reg, "hubble_flows_processed_total", protocol="TCP", type="Trace", subtype="to-endpoint",
                 verdict="FORWARDED") == 2
    assert value(reg, "hubble_flows_processed_total", protocol="TCP", type="Drop", subtype="", verdict="DROPPED") == 1
    assert value(reg, "hubble_drop_total", reason="POLICY_DENIED", protocol="TCP") == 1
    assert value(reg, "hubble_tcp_flags_total", flag="SYN", family="IPv4") == 2  # trace + verdict; the drop is not
    assert value(reg, "hubble_tcp_flags_total", flag="SYN-ACK", family="IPv4") == 1
    assert value(reg, "hubble_icmp_total", family="IPv4", type="EchoRequest") == 1
    assert value(reg, "hubble_port_distribution_total", protocol="TCP", port="8080") == 2  # not the reply
    assert value(reg, "hubble_policy_verdicts_total", direction="ingress", match="l3-l4", action="forwarded") == 1
    assert value(reg, "hubble_lost_events_total", source="PERF_EVENT_RING_BUFFER") == 3


def test_context_options_label_first():
    reg = prom.CollectorRegistry()
    m = FlowMetrics(reg, "drop:sourceContext=pod|reserved-identity;destinationContext=workload "
                         "flow:labelsContext=source_namespace,destination_app,traffic_direction")
    m.process(flow(type=ev.CILIUM_NOTIFY_DROP, subtype=133, verdict=2, drop_reason=133))
    m.process(flow(type=ev.CILIUM_NOTIFY_DROP, subtype=133, verdict=2, drop_reason=133, src_ip=WORLD_IP,
                   src_identity=2))
    assert value(reg, "hubble_drop_total", source="shop/frontend-7d4b9c6f5d-x2x9q", destination="shop/backend",
                 reason="POLICY_DENIED", protocol="TCP") == 1
    assert value(reg, "hubble_drop_total", source="reserved:world", destination="shop/backend",
                 reason="POLICY_DENIED", protocol="TCP") == 1
    assert value(reg, "hubble_flows_processed_total", source_namespace="shop", destination_app="backend",
                 traffic_direction="ingress", protocol="TCP", type="Drop", subtype="", verdict="DROPPED") == 1
    assert value(reg, "hubble_flows_processed_total", source_namespace="", destination_app="backend",
                 traffic_direction="ingress", protocol="TCP", type="Drop", subtype="", verdict="DROPPED") == 1


def test_l7_handlers_count_l7_flows():
    reg = prom.CollectorRegistry()
    m = FlowMetrics(reg, "http dns policy")
    base = flow(direction=2)
    m.process({**base, "event_type": {"type": 129}, "l7": {"type": "RESPONSE", "latency_ns": 2_000_000,
                                                             "http": {"code": 200, "method": "GET"}}})
    m.process({**base, "l7": {"type": "REQUEST", "http": {"method": "GET", "protocol": "HTTP/1.1"}}})
    m.process({**base, "l7": {"type": "RESPONSE", "dns": {"rcode": 0, "qtypes": ["A"], "ips": ["1.2.3.4"],
                                                           "rrtypes": ["A"]}}})
    assert value(reg, "hubble_http_responses_total", method="GET", status="200", reporter="client") == 1
    assert value(reg, "hubble_http_requests_total", method="GET", protocol="HTTP/1.1", reporter="client") == 1
    assert value(reg, "hubble_http_request_duration_seconds_count", method="GET", reporter="client") == 1
    assert value(reg, "hubble_dns_responses_total", rcode="No Error", qtypes="A", ips_returned="1") == 1
    assert value(reg, "hubble_dns_response_types_total", type="A", qtypes="A") == 1
    assert value(reg, "hubble_policy_verdicts_total", direction="egress", match="l7/http", action="forwarded") == 1
