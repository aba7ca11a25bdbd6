"""Exporter rotation and filters, output formats, service-map aggregation."""

from __future__ import annotations

import io

import orjson
import pytest
from hubble_helpers import WORLD_IP, flow

from propolis.errors import ValidationError
from propolis.hubble.client import parse_time, select
from propolis.hubble.exporter import FlowExporter, apply_field_mask, parse_filter_list
from propolis.hubble.printer import Printer
from propolis.hubble.servicemap import ServiceMap
from propolis.maps import events as ev

DROP = flow(type=ev.CILIUM_NOTIFY_DROP, subtype=133, verdict=2, drop_reason=133, dst_port=9000)


def test_exporter_rotates_by_size_and_keeps_backups(tmp_path):
    path = tmp_path / "hubble" / "flows.json"
    exp = FlowExporter(path, max_size_mb=0.004, max_backups=2)  # ~4 KiB: a few flows per file
    for _ in range(40):
        exp.process(flow())
    exp.close()
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["flows.json", "flows.json.1", "flows.json.2"] and exp.rotations >= 3
    for p in path.parent.iterdir():
        assert p.stat().st_size <= 0.004 * 1024 * 1024
        for line in p.read_bytes().splitlines():
            doc = orjson.loads(line)
            assert doc["flow"]["verdict"] == "FORWARDED" and doc["node_name"] == "n2" and doc["time"]
    lines = sum(len(p.read_bytes().splitlines()) for p in path.parent.iterdir())
    assert lines < 40  # the oldest went with the deleted backup


def test_exporter_allow_deny_and_field_mask(tmp_path):
    allow = parse_filter_list('[{"destination_pod": ["shop/"]}]', "allow")
    deny = parse_filter_list('{"verdict": ["FORWARDED"]}', "deny")
    exp = FlowExporter(tmp_path / "f.json", allow=allow, deny=deny, field_mask=["verdict", "source.pod_name"])
    for f in (flow(), DROP, flow(dst_ip=WORLD_IP, type=1, verdict=2, drop_reason=133)):
        exp.process(f)
    exp.lost("PERF_EVENT_RING_BUFFER", 4, "n2", "t")
    exp.close()
    docs = [orjson.loads(line) for line in (tmp_path / "f.json").read_bytes().splitlines()]
    assert docs[0]["flow"] == {"verdict": "DROPPED", "source": {"pod_name": "frontend-7d4b9c6f5d-x2x9q"}}
    assert docs[1]["lost_events"] == {"source": "PERF_EVENT_RING_BUFFER", "num_events_lost": 4} and len(docs) == 2
    assert apply_field_mask({"a": {"b": 1, "c": 2}}, ["a.b", "x.y"]) == {"a": {"b": 1}}
    for bad in ("[1]", "{nope", '[{"bogus": 1}]'):
        with pytest.raises(ValidationError):
            parse_filter_list(bad, "allow")


def test_output_formats():
    resp = {"flow": DROP, "node_name": "n2", "time": DROP["time"]}
    out = io.StringIO()
    Printer("compact", node_name=True, out=out).write(resp)
    line = out.getvalue()
    assert "[n2]: shop/frontend-7d4b9c6f5d-x2x9q:43210 (ID:40001) -> shop/backend-0:9000 (ID:40002)" in line
    assert line.rstrip().endswith("Policy denied DROPPED (TCP Flags: SYN)")
    out = io.StringIO()
    p = Printer("table", out=out)
    p.write(resp)
    p.write({"flow": flow(flags=1), "node_name": "n2"})
    rows = out.getvalue().splitlines()
    assert rows[0].split() == ["TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"] and len(rows) == 3
    out = io.StringIO()
    Printer("dict", out=out).write(resp)
    assert "    VERDICT: DROPPED" in out.getvalue() and "DESTINATION: shop/backend-0:9000" in out.getvalue()
    out = io.StringIO()
    Printer("json", out=out).write(resp)
    assert orjson.loads(out.getvalue())["drop_reason_desc"] == "POLICY_DENIED"
    out = io.StringIO()
    Printer("jsonpb", out=out).write(resp)
    assert orjson.loads(out.getvalue())["node_name"] == "n2"
    out = io.StringIO()
    Printer("compact", out=out).write({"lost_events": {"source": "PERF_EVENT_RING_BUFFER", "num_events_lost": 5}})
    assert out.getvalue().startswith("EVENTS LOST: PERF_EVENT_RING_BUFFER") and "5" in out.getvalue()
    out = io.StringIO()
    Printer("compact", out=out).write({"flow": flow(type=ev.CILIUM_NOTIFY_POLICY_VERDICT, verdict=2, match_type=0)})
    assert "policy-verdict:none INGRESS DENIED" in out.getvalue()


def test_service_map_counts_connections_once_and_every_drop():
    sm = ServiceMap(dedupe_s=5, window_s=10)
    egress = flow(direction=2, subtype=3)  # same connection seen leaving the client …
    sm.add(egress, now=100)
    sm.add(flow(), now=100.1)  # … and arriving at the server: one connection
    sm.add(flow(flags=1, tcp_flags=0x12), now=100.2)  # replies do not count
    sm.add(flow(direction=2, subtype=3, dst_port=9000), now=101)  # leaves the client …
    sm.add(DROP, now=101)  # … and is refused at the server: a drop, not a connection
    sm.add(DROP, now=102)
    sm.add(flow(src_ip="0.0.0.0", dst_ip="0.0.0.0", type=1, verdict=2, drop_reason=139), now=102)  # not IPv4
    snap = sm.snapshot(now=103)
    assert [n["id"] for n in snap["nodes"]] == ["shop/backend", "shop/frontend"]
    edges = {(e["port"], e["forwarded"], e["dropped"]) for e in snap["edges"]}
    assert edges == {(8080, 1, 0), (9000, 0, 2)}
    assert next(e for e in snap["edges"] if e["port"] == 9000)["drop_reasons"] == {"POLICY_DENIED": 2}
    assert sm.snapshot(now=200)["edges"][0]["rate"] == 0  # outside the window


def test_time_parsing_and_merge():
    assert parse_time("") == ""
    assert parse_time("5m", now=600) == "1970-01-01T00:05:00.000000000Z"
    assert parse_time("1970-01-01T00:00:01Z") == "1970-01-01T00:00:01.000000000Z"
    with pytest.raises(ValidationError):
        parse_time("yesterday")
    a = [{"time": "1"}, {"time": "3"}]
    b = [{"time": "2"}, {"time": "4"}]
    assert [r["time"] for r in select([a, b], 3, first=False)] == ["2", "3", "4"]
    assert [r["time"] for r in select([a, b], 2, first=True)] == ["1", "2"]
