"""`propolis bench flows` runs end to end at a tiny size: the real propolis-hubble process reads the ring.

A smoke test, not a benchmark: no rate is compared with a target. It checks that every generated event is
accounted for (observed by the hubble process + lost in the ring; received + lost on the bus) and that the
figures come back as rows with the workload beside them (~40 s: one bpf_lxc compile).
"""

from __future__ import annotations

import os

import pytest

from propolis_sandbox.bench.flows import run

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (BPF)")
async def test_bench_flows_tiny_run_accounts_for_every_event():
    figures = await run([1000], 1.0, identities=50, endpoints=10, peers=100, flows=200, churn=5.0)
    (row,) = figures["rows"]
    assert row["generated"] > 0 and row["accounted"], row
    assert row["observed"] == row["generated"] - row["lost_bpf_ring"]
    assert row["hubble_cpu_pct_of_core"] > 0
    assert figures["workload"]["observer"] == "propolis-hubble process"
