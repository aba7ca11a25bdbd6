"""`propolis bpf …` reads the pinned maps of a node (table and JSON)."""

from __future__ import annotations

import json

import pytest

from propolis.cli.main import main
from propolis.datapath import IPCacheEntry, PolicyEntry
from propolis.datapath import packets as pk

pytestmark = pytest.mark.root


def run_json(capsys, *argv: str):
    assert main(list(argv) + ["-o", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_shows_the_maps(harness, capsys):
    h = harness
    pin = h.dp.pin_dir
    h.endpoint(33, "10.244.7.3", 5001, ingress=True)
    h.dp.set_ipcache([IPCacheEntry("10.244.8.0/24", 5002), IPCacheEntry("10.244.7.3", 5001)])
    h.dp.set_policy(33, [PolicyEntry("ingress", identity=5002, protocol=6, port=80, end_port=81),
                         PolicyEntry("ingress", identity=0, protocol=17, deny=True)])
    assert h.ingress(pk.tcp("10.244.8.1", 999, "10.244.7.3", 80)) == 0
    assert h.ingress(pk.udp("10.244.8.1", 999, "10.244.7.3", 80)) == 2

    eps = run_json(capsys, "bpf", "endpoint", "list", "--pin-dir", pin)
    assert eps == [{"address": "10.244.7.3", "endpoint_id": 33, "identity": 5001, "ifindex": 1,
                    "ingress_enforced": True, "egress_enforced": False, "policy_audit": False, "flags": 256}]
    cache = run_json(capsys, "bpf", "ipcache", "list", "--pin-dir", pin)
    assert [(c["cidr"], c["identity"]) for c in cache] == [("10.244.7.3/32", 5001), ("10.244.8.0/24", 5002)]
    rows = run_json(capsys, "bpf", "policy", "get", "33", "--pin-dir", pin)
    assert {(r["policy"], r["identity"], r["port_protocol"]) for r in rows} == {
        ("Allow", 5002, "80-81/TCP"), ("Deny", 0, "ANY/UDP")}
    assert [r["packets"] for r in rows if r["policy"] == "Allow"] == [1]
    ct = run_json(capsys, "bpf", "ct", "list", "--pin-dir", pin)
    assert [(c["protocol"], c["direction"], c["destination"]) for c in ct] == [("TCP", "IN", "10.244.7.3:80")]
    met = run_json(capsys, "bpf", "metrics", "list", "--pin-dir", pin)
    assert {(m["reason"], m["direction"]) for m in met} >= {("Forwarded", "INGRESS"),
                                                           ("Policy denied by denylist", "INGRESS")}
    # the table form prints too
    assert main(["bpf", "policy", "get", "33", "--pin-dir", pin]) == 0
    out = capsys.readouterr().out
    assert "80-81/TCP" in out and "POLICY" in out
    assert main(["bpf", "policy", "get", "34", "--pin-dir", pin]) == 1
