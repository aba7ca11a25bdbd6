"""`propolis status` on a real one-node sandbox running the whole suite: every running service and the
feature states are reported, and a SIGKILLed service is unhealthy within its heartbeat timeout.

The supervisor restarts a dead service within a second, and a restarted instance rightly makes the
service healthy again; to see the dead one, the test freezes the supervisor (SIGSTOP) around the kill
and thaws it (SIGCONT) afterwards, which also shows the cluster recovering.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from propolis.status import collect
from propolis.suite import SUITE_SERVICES
from propolis_sandbox import cluster
from propolis_sandbox.config import SandboxConfig, SandboxState
from propolis_sandbox.fixture import running_sandbox

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=1, services="all") as state:
        asyncio.run(cluster.wait(state, timeout=60))
        yield state


def current(state: SandboxState) -> SandboxState:
    """state.json as the supervisor last saved it: a restarted service has a new pid."""
    return SandboxState.load(SandboxConfig(name=state.config["name"]).state_path)


def status(state, *flags: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "propolis.cli.main", "status", "--name", state.config["name"],
                           "-o", "json", *flags], capture_output=True, text=True, timeout=60)
    return proc.returncode, json.loads(proc.stdout)


def by_instance(doc: dict, service: str) -> list[dict]:
    return [s for s in doc["services"] if s["service"] == service]


def test_status_reports_every_running_service_and_the_features(sandbox):
    code, doc = status(sandbox, "--wait", "--wait-duration", "30")
    assert code == 0 and doc["healthy"], doc["problems"]
    node = sandbox.nodes[0]["name"]
    services = current(sandbox).services
    running = {(s["name"], s["node"]) for s in services}
    assert running == {(s.name, node if s.scope == "node" else f"{sandbox.config['name']}-control-plane")
                       for s in SUITE_SERVICES if s.runs_in(sandbox.sandbox())}
    reported = {(s["service"], s["node"]): s for s in doc["services"]}
    for key in running | {("kubelet", node)}:
        assert reported[key]["health"] == "ok" and reported[key]["version"], key
    assert {s["pid"] for s in services} <= {s["pid"] for s in doc["services"] if s["health"] == "ok"}
    assert doc["kubernetes"]["state"] == "OK" and doc["kubernetes"]["nodes"] == [node]
    assert doc["nats"]["connected"] and doc["nats"]["jetstream"]["state"] == "OK"

    features = doc["features"]
    assert features["KubeProxyReplacement"]["state"] == "True"
    assert features["KubeProxyReplacement"]["source"] == "datapath-writer"
    assert features["Policy enforcement"]["state"] == "Default"
    assert features["Encryption"]["state"] == "Disabled" and "wireguard-keymgr not running" in \
        features["Encryption"]["reason"]
    assert features["Cluster Mesh"] == {"state": "Disabled", "reason": "clustermesh-apiserver not running"}
    if any(s.name == "hubble" for s in SUITE_SERVICES):
        assert features["Hubble"]["source"] == "hubble"
    else:
        assert features["Hubble"] == {"state": "Disabled", "reason": "hubble not running"}
    if not doc["kernel"]["sch_fq"]["available"]:  # the sandbox turns the Bandwidth Manager on: tbf, and why
        assert features["BandwidthManager"]["state"] == "tbf"
        assert "sch_fq missing" in features["BandwidthManager"]["detail"]
        assert "reason" not in features["BandwidthManager"]  # a fallback, not a problem


async def test_a_killed_service_is_unhealthy_within_its_heartbeat_timeout(sandbox):
    victim = next(s for s in current(sandbox).services if s["name"] == "identity-allocator")
    bus = sandbox.admin_bus("status-test")
    await bus.connect(max_wait=5)
    os.kill(sandbox.supervisor_pid, signal.SIGSTOP)  # no restart while we look
    try:
        os.kill(victim["pid"], signal.SIGKILL)
        killed = time.monotonic()
        while True:
            rep = await collect(bus, probe_kernel=False)
            row = next(s for s in rep.services if s.get("pid") == victim["pid"])
            if row["health"] == "unhealthy":
                break
            assert time.monotonic() - killed < row["stale_after_s"] + 2, row
            await asyncio.sleep(0.25)
        assert row["reasons"][0].startswith("no heartbeat for") and not rep.healthy
        code, doc = await asyncio.to_thread(status, sandbox)
        assert code == 1 and any(p.startswith(f"identity-allocator on {victim['node']}: unhealthy")
                                 for p in doc["problems"])
    finally:
        os.kill(sandbox.supervisor_pid, signal.SIGCONT)
        await bus.close()

    code, doc = await asyncio.to_thread(status, sandbox, "--wait", "--wait-duration", "30")
    assert code == 0, doc["problems"]
    allocators = {s["pid"]: s["health"] for s in by_instance(doc, "identity-allocator")}
    assert allocators[victim["pid"]] == "replaced" and "ok" in allocators.values()
