"""`propolis bench node`'s socket LB part runs end to end with a few connects (a smoke test, not a benchmark):
the node's connects through socket LB and the pod's through the per-packet path both reach both backends of
the same Service, the floor path reaches the one backend it names, and every figure is a positive number."""

from __future__ import annotations

import asyncio

import pytest

from propolis_sandbox.bench import node
from propolis_sandbox.bench.socket_lb import NAMESPACE, connect_latency
from propolis_sandbox.fixture import running_sandbox

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


def test_connect_latency_socket_lb_vs_per_packet_lb_same_run():
    with running_sandbox(nodes=2, services=node.SERVICES) as state:
        rows = asyncio.run(connect_latency(state, 30))
    assert [r["path"] for r in rows] == ["socket LB: node -> ClusterIP", "per-packet LB: pod -> ClusterIP",
                                         "no LB: node -> backend pod IP"]
    backends = {f"{NAMESPACE}/web-1", f"{NAMESPACE}/web-2"}
    for row in rows:
        assert row["connects"] == 60 and 0 < row["p50_us"] <= row["p90_us"] <= row["p99_us"], row
        assert sum(row["peers"].values()) == 60, row
    assert set(rows[0]["peers"]) == backends and set(rows[1]["peers"]) == backends
    assert set(rows[2]["peers"]) == {f"{NAMESPACE}/web-1"}
