"""`propolis connectivity test` on a real sandbox running the whole suite: every scenario passes, a wrong
expectation is reported as a failure, and the test namespace is gone afterwards."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from propolis.connectivity import runner
from propolis.connectivity.scenarios import DROPPED, WORLD_IP, Check, Scenario, Selection
from propolis_sandbox import cluster
from propolis_sandbox.connectivity_cluster import SandboxCluster
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.resources import KINDS, documents_from

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
    assert proc.returncode == 0, [(t["name"], [c["detail"] for c in t["checks"] if not c["ok"]])
                                  for t in report["tests"] if t["result"] == "fail"]
    assert results["no-policies"] == "pass" and results["deny-beats-allow"] == "pass"
    assert results["to-world-denied"] == "pass"  # Hubble runs in the sandbox and saw the policy drop
    assert all(r in ("pass", "skip") for r in results.values()), results
    assert results["echo-ingress-l7"] == "pass"  # real HTTP requests judged by the L7 proxy
    assert results["to-fqdns"] == results["dns-only"] == "pass"  # real names through the DNS proxy

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
    wrong = Scenario("wrong", "expects drops that no policy causes",
                     checks=(Check("client", "pod:echo-same-node", DROPPED),
                             Check("client", f"world:{WORLD_IP}", DROPPED, port=80)))
    r = runner.Runner(SandboxCluster(sandbox))
    try:
        await r.deploy()
        outcome = await r.run(wrong)
    finally:
        await r.cleanup()
    assert outcome.result == runner.FAIL and "connected" in outcome.checks[0].detail
    # without a policy the world host answers (sandbox/world.py): a DROPPED expectation fails there too
    assert not outcome.checks[1].ok and "answered by world" in outcome.checks[1].detail


def test_selection_include_exclude():
    sel = Selection.parse(["no-policies,deny-all", "!deny-all"])
    assert [s.name for s in sel.chosen()] == ["no-policies"]
    assert Selection.parse(["nope"]).unknown() == ["nope"]


async def test_policy_cli_shows_what_a_pod_enforces(sandbox):
    """`propolis policy get NS/POD -o json` compiles the bus's policies for that pod: the echo pod accepts
    TCP 8080 from the client's identity only, and the client is selected by nothing."""
    from propolis.connectivity.scenarios import SCENARIOS

    scenario = next(s for s in SCENARIOS if s.name == "echo-ingress-from-label")
    r = runner.Runner(SandboxCluster(sandbox))
    docs = documents_from("test", list(scenario.policies))
    env = {**__import__("os").environ, "PROPOLIS_SANDBOX_NAME": sandbox.config["name"]}

    def policy_get(pod: str) -> dict:
        proc = subprocess.run([sys.executable, "-m", "propolis.cli.main", "policy", "get", pod, "-o", "json"],
                              capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    try:
        await r.deploy()
        await cluster.apply_documents(sandbox, docs)
        await cluster.wait(sandbox)
        echo = policy_get("propolis-test/echo-same-node")
        client = policy_get("propolis-test/client")
    finally:
        await r.cleanup()
        await cluster.delete_documents(sandbox, docs)
    assert echo["ingressEnforced"] and not echo["egressEnforced"]
    assert echo["policies"] == ["CiliumNetworkPolicy/propolis-test/echo-ingress-from-client"]
    rows = sorted((e["direction"], e["identity"] == 1, e["protocol"], e["port"], e["deny"]) for e in echo["entries"])
    # the client's TCP 8080, and (allow-localhost) its own node on anything
    assert rows == [("ingress", False, 6, 8080, False), ("ingress", True, 0, 0, False)]
    assert not client["ingressEnforced"] and client["entries"] == []


def test_kubeconfig_cluster_runs_scenarios_through_the_api_and_exec(sandbox):
    """`--kubeconfig`: the product's Kubernetes-API cluster (kube.py) against the sandbox's API server: pods
    created through the API, probes by pods/exec in the client pods (and a host-netns pod for node sources),
    waits on the suite's heartbeats. No sandbox code on the client side."""
    kubeconfig = sandbox.sandbox().run_dir / "kubeconfig"
    proc = subprocess.run([sys.executable, "-m", "propolis.cli.main", "connectivity", "test", "--kubeconfig",
                           str(kubeconfig), "--name", sandbox.config["name"], "-o", "json",
                           "--test", "no-policies,echo-ingress-from-label"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert {t["name"]: t["result"] for t in report["tests"]} == {"no-policies": "pass",
                                                                 "echo-ingress-from-label": "pass"}
    details = {c["check"]: c["detail"] for t in report["tests"] for c in t["checks"]}
    assert details["node:1 -> nodeport:echo-other-node@2:8080/TCP"] == \
        "connected, answered by propolis-test/echo-other-node"
    assert details["client2 -> pod:echo-same-node:8080/TCP"].startswith("not connected")  # the policy's drop
