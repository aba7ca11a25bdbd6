"""Hubble in a sandbox running the whole suite: the connectivity workload's allowed and denied
probes show up in `propolis observe` (found through the relay's heartbeat) as FORWARDED and DROPPED
flows with the pods, identities, ports and drop reason, from both nodes."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest

from propolis.connectivity import runner
from propolis.connectivity.scenarios import ECHO_PORT, NAMESPACE, SCENARIOS
from propolis_sandbox.connectivity_cluster import SandboxCluster
from propolis_sandbox.fixture import running_sandbox

pytestmark = pytest.mark.root


def observe(state, *args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "propolis.cli.main", "observe", "-o", "json", *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PROPOLIS_SANDBOX_NAME": state.config["name"]})
    assert proc.returncode == 0, proc.stderr
    return [orjson.loads(line) for line in proc.stdout.splitlines()]


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=2, services="all") as state:
        yield state


async def test_probes_become_flows_with_identities_and_drop_reasons(sandbox):
    names = [s["name"] for s in sandbox.services]
    assert names.count("hubble") == 2 and names.count("hubble-relay") == 1
    r = runner.Runner(SandboxCluster(sandbox))
    try:
        await r.deploy()
        scenarios = {s.name: s for s in SCENARIOS}
        for name in ("no-policies", "echo-ingress-from-label"):
            outcome = await r.run(scenarios[name])
            assert outcome.result == runner.PASS, outcome.to_json()
        flows = observe(sandbox, "--namespace", NAMESPACE, "--last", "2000", "--to-port", str(ECHO_PORT))
        assert flows, "no flows to the echo port"
        forwarded = [f for f in flows if f["verdict"] == "FORWARDED"
                     and f["source"].get("pod_name") == "client"
                     and f["destination"].get("pod_name") == "echo-same-node"]
        assert forwarded and forwarded[0]["source"]["identity"] > 255
        assert "k8s:name=client" in forwarded[0]["source"]["labels"]
        assert forwarded[0]["destination"]["namespace"] == NAMESPACE
        dropped = [f for f in flows if f["verdict"] == "DROPPED" and f["event_type"]["type"] == 1
                   and f["source"].get("pod_name") == "client2"]
        assert dropped and dropped[0]["drop_reason_desc"] == "POLICY_DENIED"
        assert dropped[0]["destination"]["pod_name"] == "echo-same-node"
        assert dropped[0]["l4"]["TCP"]["destination_port"] == ECHO_PORT
        nodes = {f["node_name"] for f in flows}
        assert nodes == {n["name"] for n in sandbox.nodes}, nodes  # the cross-node probes: both observers
        one = sandbox.nodes[-1]["name"]
        assert {f["node_name"] for f in observe(sandbox, "--node-name", one, "--last", "50")} == {one}
        client2_drops = observe(sandbox, "--from-pod", f"{NAMESPACE}/client2", "--verdict", "DROPPED", "--last", "50")
        assert client2_drops, "client2's denied probes are DROPPED flows"
        assert all(f["verdict"] == "DROPPED" and f["source"]["pod_name"] == "client2" for f in client2_drops)
        status = subprocess.run([sys.executable, "-m", "propolis.cli.main", "hubble", "status", "-o", "json"],
                                capture_output=True, text=True, timeout=60,
                                env={**os.environ, "PROPOLIS_SANDBOX_NAME": sandbox.config["name"]})
        st = orjson.loads(status.stdout)
        assert st["via"].startswith("http://") and st["num_connected_nodes"] == 2, st  # the relay, from its heartbeat
        assert st["max_flows"] == 2 * 4095 and st["seen_flows"] >= len(flows)
    finally:
        await r.cleanup()
