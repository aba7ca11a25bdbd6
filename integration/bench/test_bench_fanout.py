"""`propolis bench fanout` runs end to end at a tiny size: real nats-server, real consumer processes.

A smoke test, not a benchmark: no latency is compared with a target. It checks what the bench counts is
right: each simulated node receives every update its layout sends it (whole bucket: all of them; per-node:
its own and the shared projection's), the initial sync completes for every consumer in both layouts (each
per-node consumer reading only its own keys and the shared ones), and the output is a table then one JSON
document.
"""

from __future__ import annotations

import json

import pytest

from propolis_sandbox.bench.fanout import run

pytestmark = pytest.mark.timeout(120)


async def test_bench_fanout_tiny_run_counts_every_delivery(capsys):
    assert await run([3], [40], 1.0, [200], [1, 3]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(out[-1])
    assert doc["bench"] == "fanout" and doc["machine"]["cores"] >= 1 and doc["command"]
    rows = {r["layout"]: r for r in doc["results"]}
    assert set(rows) == {"full", "per-node"}
    for row in rows.values():
        assert row["failures"] == 0 and row["delivered_pct"] == 100.0, row
        assert row["p50_ms"] is not None and row["p50_ms"] > 0
    syncs = doc["initial_sync"]
    assert [(s["layout"], s["consumers"], s["complete"]) for s in syncs] == [
        ("full", 1, 1), ("per-node", 1, 1), ("full", 3, 3), ("per-node", 3, 3)]
    assert all(s["failures"] == 0 for s in syncs)
    # whole bucket: every consumer reads all 200 keys; per-node: its own third of 180 plus the 20 shared ones
    assert [s["deliveries"] for s in syncs] == [200, 200, 600, 3 * 20 + 180]
    assert any(line.startswith("layout") for line in out[:-1])  # the table before the JSON
