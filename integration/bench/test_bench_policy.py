"""`propolis bench policy` runs end to end with tiny sizes and prints well-formed figures.

A smoke test, not a benchmark: no figure is compared with a target (the machine is shared and
noisy); it checks that every part runs, prints a table and one JSON document with versions,
gives a number for every row, and leaves no sandbox, pins or namespaces behind (~20 s).
"""

from __future__ import annotations

import json
import math
import os

import pytest

from propolis.errors import CliError
from propolis_sandbox.bench.policy import Options, parse_parts, run

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def test_parts_are_validated():
    assert parse_parts("3,1") == (1, 3)
    with pytest.raises(CliError):
        parse_parts("1,5")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (BPF, namespaces)")
async def test_bench_policy_tiny_run_prints_table_and_json(capsys):
    opt = Options(parts=(1, 2, 3, 4), policies=20, identities=30, changes=3, map_endpoints=5, updates=2,
                  attach_pods=2, packet_repeat=100, packet_rounds=2)
    assert await run(opt) == 0
    out = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(out[-1])
    assert out[0].split()[:5] == ["part", "measure", "n", "p50", "p99"]
    assert doc["bench"] == "policy"
    assert {"kernel", "bcc", "nats-server"} <= set(doc["versions"])
    assert {r["part"] for r in doc["results"]} == {1, 2, 3, 4}
    for row in doc["results"]:
        assert row["n"] and row["n"] > 0, row
        assert isinstance(row["p50"], (int, float)) and math.isfinite(row["p50"]) and row["p50"] >= 0, row
    details = doc["details"]
    assert details["maps"]["rows"] > 0 and details["apply"]["updates"] == 2
    assert details["sandbox_leftovers"] == {}
    assert len(details["packet"]) == 2
