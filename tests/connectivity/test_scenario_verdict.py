"""A connectivity scenario passes only on evidence: one that checks nothing, or a run in which every
scenario was skipped, is an error, never a PASS (issue 13)."""

from __future__ import annotations

from propolis.connectivity import runner
from propolis.connectivity.scenarios import DROPPED, SCENARIOS, Check, Scenario
from propolis_sandbox.config import SandboxState
from propolis_sandbox.connectivity_cluster import SandboxCluster

ALLOWED_CHECK = Check("client", "pod:echo-same-node")
DROPPED_CHECK = Check("client2", "pod:echo-same-node", DROPPED)


def one_node() -> runner.Runner:
    """A runner for a one-node sandbox that is never contacted: the verdicts below need no cluster."""
    return runner.Runner(SandboxCluster(SandboxState(config={"name": "verdict"}, nodes=[{"name": "verdict-worker"}])))


def outcome(scenario: Scenario, result: str) -> runner.ScenarioOutcome:
    return runner.ScenarioOutcome(scenario, result)


async def test_a_scenario_without_checks_fails_without_touching_the_cluster() -> None:
    empty = Scenario("checks-nothing", "applies a policy and probes nothing", checks=())
    got = await one_node().run(empty)
    assert (got.result, got.reason, got.checks) == (runner.FAIL, runner.NO_CHECKS, [])
    assert runner.render(got).startswith("[FAIL] checks-nothing")


def test_checks_decide_the_verdict_and_none_is_a_failure() -> None:
    ok, wrong = (runner.CheckOutcome(ALLOWED_CHECK, True, "connected"),
                 runner.CheckOutcome(DROPPED_CHECK, False, "connected, expected dropped"))
    assert runner.verdict([]) == (runner.FAIL, runner.NO_CHECKS)
    assert runner.verdict([ok]) == (runner.PASS, "")
    assert runner.verdict([ok, wrong]) == (runner.FAIL, "1/2 checks failed")


def test_a_run_that_skipped_everything_is_not_a_pass() -> None:
    a, b = SCENARIOS[0], SCENARIOS[1]
    skipped = [outcome(a, runner.SKIP), outcome(b, runner.SKIP)]
    assert not runner.run_passed(skipped) and not runner.run_passed([])
    assert runner.summary(skipped) == "No test ran, 2 skipped: nothing was checked"
    assert runner.run_passed([outcome(a, runner.PASS), outcome(b, runner.SKIP)])
    assert not runner.run_passed([outcome(a, runner.PASS), outcome(b, runner.FAIL)])
    assert runner.summary([outcome(a, runner.PASS), outcome(b, runner.SKIP)]) == "All 1 tests passed, 1 skipped"


def test_every_defined_scenario_has_checks() -> None:
    assert SCENARIOS and [s.name for s in SCENARIOS if not s.checks] == []
