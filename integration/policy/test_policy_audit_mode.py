"""Policy audit mode end to end, the workflow people follow for their first policies (Cilium's docs): a
default-deny policy, the endpoint switched to audit with `propolis endpoint config NS/POD
PolicyAuditMode=Enabled`, real probes that policy would drop still connect, `observe --verdict AUDIT
-o json` (what policy generators read) reports exactly those would-be drops as policy-verdict flows,
then audit off and the same probes are dropped.

Workload (one sandbox running the whole suite): a/server app=server (node 1), a/client app=client
(node 2), a/intruder app=intruder (node 1); the policy allows only client -> server:8080.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import orjson
import pytest
from policy_workload import NO, OK, PodDef, Workload, cnp, sel

from propolis_sandbox import cluster
from propolis_sandbox.fixture import running_sandbox

pytestmark = pytest.mark.root

POLICY = cnp("server-ingress", {"endpointSelector": sel(app="server"),
                                "ingress": [{"fromEndpoints": [sel(app="client")],
                                             "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]})
WOULD_DROP = [("a/intruder", "a/server", 8080, "TCP"), ("a/client", "a/server", 8081, "TCP")]
ALLOWED = [("a/client", "a/server", 8080, "TCP")]


def cli(state, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "propolis.cli.main", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PROPOLIS_SANDBOX_NAME": state.config["name"]})


def cli_json(state, *args: str) -> list:
    proc = cli(state, *args, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    return [orjson.loads(line) for line in proc.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=2, services="all") as state:
        asyncio.run(cluster.wait(state, timeout=60))
        yield state


async def test_audit_workflow_reports_would_be_drops_and_drops_nothing(sandbox):
    workload = Workload(sandbox, "audit", {"a": {}}, [
        PodDef("a/server", 1, {"app": "server"}, server=True),
        PodDef("a/client", 2, {"app": "client"}),
        PodDef("a/intruder", 1, {"app": "intruder"})])
    async with workload as w:
        server = f"{w.ns('a')}/server"
        await w.apply([POLICY])
        assert await w.verify("enforced", [(*c, NO) for c in WOULD_DROP] + [(*c, OK) for c in ALLOWED]) == []

        bad = cli(sandbox, "endpoint", "config", server, "PolicyAuditMode=Maybe")
        assert bad.returncode != 0 and "PolicyAuditMode" in bad.stderr, bad.stderr
        (config,) = cli_json(sandbox, "endpoint", "config", server, "PolicyAuditMode=Enabled")
        assert config["options"] == {"PolicyAuditMode": "Enabled"}
        for _ in range(50):  # `endpoint list` reads the writer's heartbeat, published just after the change
            (row,) = [r for r in cli_json(sandbox, "endpoint", "list")[0] if f"{r['namespace']}/{r['pod']}" == server]
            if row["policyEnforcement"]["ingress"] == "Disabled (Audit)":
                break
            await asyncio.sleep(0.1)
        assert row["policyEnforcement"]["ingress"] == "Disabled (Audit)", row

        assert await w.verify("audit", [(*c, OK) for c in WOULD_DROP + ALLOWED]) == []
        audited = cli_json(sandbox, "observe", "--verdict", "AUDIT", "--to-pod", server, "--last", "100")
        seen = {(f["source"]["pod_name"], f["l4"]["TCP"]["destination_port"]) for f in audited}
        assert seen == {("intruder", 8080), ("client", 8081)}, audited
        assert all(f["event_type"]["type"] == 5 and f["traffic_direction"] == "INGRESS" for f in audited)
        verdicts = cli_json(sandbox, "observe", "--type", "policy-verdict", "--to-pod", server, "--last", "100")
        assert {f["verdict"] for f in verdicts} >= {"AUDIT", "FORWARDED"}
        assert not [f for f in cli_json(sandbox, "observe", "--verdict", "DROPPED", "--to-pod", server,
                                         "--last", "100") if f["time"] > audited[0]["time"]]

        (config,) = cli_json(sandbox, "endpoint", "config", server, "PolicyAuditMode=Disabled")
        assert config["options"] == {"PolicyAuditMode": "Disabled"}
        # a fresh source port per probe: each is a new connection, decided by policy again
        assert await w.verify("audit off", [(*c, NO) for c in WOULD_DROP] + [(*c, OK) for c in ALLOWED]) == []
        await w.delete([POLICY])
