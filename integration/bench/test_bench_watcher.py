"""`propolis bench watcher` runs end to end with tiny sizes and prints well-formed figures.

A smoke test, not a benchmark: no figure is compared with a target (the machine is shared and
noisy). It checks that every part runs against a real API server process, nats-server and service
processes, prints a table and one JSON document with versions, and gives a finite number for every
row (~10 s).
"""

from __future__ import annotations

import json
import math

import pytest

from propolis.errors import CliError
from propolis_sandbox.bench.watcher import Options, run

pytestmark = pytest.mark.timeout(60)


def test_options_are_validated():
    with pytest.raises(CliError):
        Options(pods=0).validate()
    with pytest.raises(CliError):
        Options(rate=0).validate()


async def test_bench_watcher_tiny_run_prints_table_and_json(capsys):
    opt = Options(pods=60, services=6, namespaces=2, updates=20, rate=50, allocations=30, concurrency=4,
                  rss_settle=1.0)
    assert await run(opt, "propolis bench watcher (smoke)") == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].split()[:4] == ["figure", "value", "unit", "target"]
    doc = json.loads(out[-1])
    assert doc["bench"] == "watcher" and doc["command"] == "propolis bench watcher (smoke)"
    assert {"nats-server", "kubernetes_asyncio", "python"} <= set(doc["versions"])
    figures = {r["figure"]: r for r in doc["results"]}
    for name in ("idle RSS k8s-watcher", "idle RSS identity-allocator", "initial sync (spawn -> watermark)",
                 "initial sync throughput", "k8s-watcher RSS at 60 pods", "event -> KV p50", "event -> KV p99",
                 "identity allocations, 2 racing replicas"):
        assert name in figures, sorted(figures)
    for row in doc["results"]:
        assert isinstance(row["value"], (int, float)) and math.isfinite(row["value"]), row
        if not row["figure"].startswith("API answer"):  # that one may be < 0 (KV faster than the HTTP answer)
            assert row["value"] > 0, row
    details = doc["details"]
    assert details["initial_sync"]["objects"]["pods"] == 60 and details["initial_sync"]["objects"]["services"] == 6
    assert details["latency"]["delivered"] == 20
    assert details["allocations"]["agree"] is True and details["allocations"]["distinct"] == 30
