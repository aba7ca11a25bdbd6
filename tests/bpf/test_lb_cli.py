"""`propolis service list` and `propolis bpf lb list` read the node's LB maps (table and JSON)."""

from __future__ import annotations

import json

import pytest

from propolis.cli.main import main
from propolis.lb import Backend, LBService
from propolis.maps import lb as lbmaps

pytestmark = pytest.mark.root


def test_service_and_bpf_lb_list(harness, capsys):
    dp = harness.dp
    for spec in lbmaps.SPECS:
        dp._map(spec.pin_name).clear()
    dp._services = None
    try:
        dp.set_services([
            LBService("default", "web", "http", "ClusterIP", "10.96.0.10", 80, "TCP",
                      (Backend("10.244.1.20", 8080), Backend("10.244.1.30", 8080, state="terminating")),
                      session_affinity=True, affinity_timeout=30),
            LBService("default", "web", "http", "NodePort", "172.18.0.2", 30080, "TCP", ()),
        ])
        pin = dp.pin_dir
        assert main(["service", "list", "--pin-dir", pin, "-o", "json"]) == 0
        views = json.loads(capsys.readouterr().out)
        assert [(v["frontend"], v["protocol"]) for v in views] == [("10.96.0.10:80", "TCP"),
                                                                  ("172.18.0.2:30080", "TCP")]
        assert [b["address"] for b in views[0]["backends"]] == ["10.244.1.20:8080"]  # terminating: no slot
        assert views[0]["affinity_timeout"] == 30 and "NodePort" in views[1]["flags"]
        assert main(["service", "list", "--pin-dir", pin]) == 0
        table = capsys.readouterr().out
        assert "10.96.0.10:80/TCP" in table and "=> 10.244.1.20:8080/TCP (active)" in table
        assert "no backends" in table

        assert main(["bpf", "lb", "list", "--pin-dir", pin, "-o", "json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert {(r["frontend"], r["slot"]) for r in rows} == {("10.96.0.10:80", 0), ("10.96.0.10:80", 1),
                                                             ("172.18.0.2:30080", 0)}
        assert [r["backend"]["address"] for r in rows if r["slot"]] == ["10.244.1.20:8080"]
        assert main(["bpf", "lb", "list", "--pin-dir", pin]) == 0
        assert "REVNAT_ID" in capsys.readouterr().out
        assert main(["service", "list", "--pin-dir", "/sys/fs/bpf/propolis/no-such-node-x"]) == 1
    finally:
        dp.set_services([])
