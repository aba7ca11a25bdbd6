"""`propolis connectivity test` on a real sandbox running the whole suite: every scenario passes, a wrong
expectation is reported as a failure, and the test namespace is gone afterwards."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from propolis.connectivity import runner
from propolis.connectivity.scenarios import DROPPED, Check, Scenario, Selection
from propolis.sandbox import cluster
from propolis.sandbox.fixture import running_sandbox
from propolis.sandbox.resources import KINDS

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=2, services="all") as state:
        yield state


def test_every_scenario_passes_and_cleans_up(sandbox):
    proc = subprocess.run([sys.executable, "-m", "propolis.cli.main", "connectivity", "test",
                           "--name", sandbox.config["name"], "-o", "json"],
                          capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout)
    results = {t["name"]: t["result"] for t in report["tests"]}
    assert proc.returncode == 0, report
    assert results["no-policies"] == "pass" and results["deny-beats-allow"] == "pass"
    assert all(r in ("pass", "skip") for r in results.values()), results
    assert results["echo-ingress-l7"] == "skip"  # needs the L7 proxy, not built yet

    async def namespace_gone() -> bool:
        async with cluster.Api(sandbox.apiserver_url) as api:
            try:
                await api.get(KINDS["Namespace"], None, "propolis-test")
            except cluster.ApiError as exc:
                return exc.status == 404
        return False

    import asyncio
    assert asyncio.run(namespace_gone())


async def test_a_wrong_expectation_fails(sandbox):
    """Without policies echo answers: a check expecting a drop must fail (the runner can say no)."""
    wrong = Scenario("wrong", "expects a drop that no policy causes",
                     checks=(Check("client", "pod:echo-same-node", DROPPED),))
    r = runner.Runner(sandbox)
    try:
        await r.deploy()
        outcome = await r.run(wrong)
    finally:
        await r.cleanup()
    assert outcome.result == runner.FAIL and "connected" in outcome.checks[0].detail


def test_selection_include_exclude():
    sel = Selection.parse(["no-policies,deny-all", "!deny-all"])
    assert [s.name for s in sel.chosen()] == ["no-policies"]
    assert Selection.parse(["nope"]).unknown() == ["nope"]
