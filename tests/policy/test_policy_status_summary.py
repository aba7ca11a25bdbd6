"""`propolis status` and `propolis policy get` say which policies are accepted but not (fully) enforced, and
which endpoints' policy failed where — read from a real bus."""

from __future__ import annotations

import json
import time

from propolis.bus import codec, subjects
from propolis.bus.messages import Heartbeat, Watermark
from propolis.cli.main import build_parser
from propolis.k8s.kinds import KINDS
from propolis.status import policy_summary

L7_POLICY = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
             "metadata": {"name": "l7", "namespace": "prod", "uid": "u1", "resourceVersion": "5"},
             "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                      "ingress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}],
                                                "rules": {"l7proto": "r2d2", "l7": [{"cmd": "READ"}]}}]}]}}
PLAIN_POLICY = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "deny", "namespace": "prod", "uid": "u2", "resourceVersion": "6"},
                "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}


def writer_beat(node: str, failures: dict[str, str]) -> Heartbeat:
    now = time.time()
    hb = Heartbeat(service="datapath-writer", node=node, instance=f"dw-{node}", version="0.1.0", pid=1,
                   started_at=now - 10, sent_at=now, health="degraded", components={},
                   progress={"endpoint_policy_failures": failures}, interval=2.0)
    return codec.decode(codec.encode(hb), Heartbeat)


def test_summary_names_unenforced_fields_and_failed_endpoints():
    records = [KINDS["ciliumnetworkpolicies"].to_record(L7_POLICY), KINDS["networkpolicies"].to_record(PLAIN_POLICY)]
    summary = policy_summary(records, [writer_beat("w1", {"endpoint 7 (prod/big)": "entries: 17001 rows exceed"}),
                                       writer_beat("w2", {})])
    assert summary["in_force"] == 2
    assert list(summary["not_enforced"]) == ["CiliumNetworkPolicy/prod/l7"]
    (item,) = summary["not_enforced"]["CiliumNetworkPolicy/prod/l7"]
    assert item.startswith("spec.ingress[0].toPorts[0].rules: no L7 proxy enforces this rule family yet")
    assert summary["failed_endpoints"] == {"w1": {"endpoint 7 (prod/big)": "entries: 17001 rows exceed"}}


async def test_status_and_policy_get_show_them_from_the_bus(bus, nats_server, capsys):
    k8s = await bus.kv(subjects.K8S_BUCKET)
    for plural, obj in (("ciliumnetworkpolicies", L7_POLICY), ("networkpolicies", PLAIN_POLICY)):
        rec = KINDS[plural].to_record(obj)
        await k8s.put(subjects.k8s_key(plural, rec.namespace, rec.name), rec)
    await (await bus.kv(subjects.HEARTBEATS_BUCKET)).put(
        subjects.heartbeat_key("datapath-writer", "w1", "dw-w1"), writer_beat("w1", {"endpoint 7 (prod/big)": "full"}))

    args = build_parser().parse_args(["--nats-url", nats_server.url, "status", "-o", "json"])
    await args.func(args)
    doc = json.loads(capsys.readouterr().out)
    assert doc["policies"]["in_force"] == 2
    assert "CiliumNetworkPolicy/prod/l7" in doc["policies"]["not_enforced"]
    assert doc["policies"]["failed_endpoints"] == {"w1": {"endpoint 7 (prod/big)": "full"}}

    args = build_parser().parse_args(["--nats-url", nats_server.url, "status"])
    await args.func(args)
    text = capsys.readouterr().out
    assert "accepted, not enforced: CiliumNetworkPolicy/prod/l7 spec.ingress[0].toPorts[0].rules" in text
    assert "failed on w1: endpoint 7 (prod/big): full" in text

    # `policy get` reads through the watermark gates, as the writers do: stamp both buckets.
    mark = Watermark(resource_version=6, time=time.time(), epoch="e1")
    await k8s.put(subjects.WATERMARK_KEY, mark)
    await (await bus.kv(subjects.IDENTITIES_BUCKET)).put(subjects.WATERMARK_KEY, mark)
    args = build_parser().parse_args(["--nats-url", nats_server.url, "policy", "get"])
    await args.func(args)
    text = capsys.readouterr().out
    assert "accepted, not enforced CiliumNetworkPolicy/prod/l7: spec.ingress[0].toPorts[0].rules: no L7 proxy enforces" in text
