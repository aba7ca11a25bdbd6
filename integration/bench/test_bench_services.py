"""`propolis bench services` runs end to end at a tiny size and prints well-formed figures.

A smoke test, not a benchmark: no figure is compared with a target. It checks that the connection
latency is measured to the first, middle and last Service on both sides, that the writer's map writes
and the product path (API write -> pinned LB map through a one-node sandbox) give numbers, that the
output is tables then one JSON document with versions, machine and command, and that nothing is left
behind (~20 s).
"""

from __future__ import annotations

import json
import math
import os

import pytest

from propolis_sandbox.bench.services import probe_points, run

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]


def test_probe_points_are_first_middle_and_last():
    assert probe_points(10) == [("first", 0), ("middle", 5), ("last", 9)]
    assert probe_points(1) == [("first", 0)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (BPF, namespaces, iptables)")
def test_bench_services_tiny_run_prints_tables_and_one_json(capsys):
    assert run([4, 10], connections=20, update_samples=5, product_samples=3, repeat=100) == 0
    out = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(out[-1])
    assert all(not line.startswith("{") for line in out[:-1])  # tables, then one document
    assert doc["bench"] == "services" and doc["command"].startswith("propolis bench")
    assert {"propolis", "kernel", "python"} <= set(doc["versions"])
    assert doc["machine"]["cores"] >= 1 and len(doc["machine"]["load_avg_start"]) == 3
    assert [r["probe"].split()[0] for r in doc["results"]] == ["first", "middle", "last"] * 2
    for row in doc["results"]:
        for side in ("ebpf", "ipt"):
            assert row[f"{side}_fails"] == 0, row  # private namespaces: no connection may fail
            assert math.isfinite(row[f"{side}_p50_us"]) and row[f"{side}_max_us"] >= row[f"{side}_p50_us"]
    for change in doc["changes"]:
        assert 0 < change["writer_add_p50_ms"] <= change["writer_add_max_ms"]
    product = doc["product_path"]
    assert product["missed_within_10s"] == 0 and product["sandbox_leftovers"] == {}
    assert product["frontends_in_map_before"] >= 10
    assert product["add_ms"]["n"] == 3 and product["delete_ms"]["n"] == 3 and "max" in product["add_ms"]
