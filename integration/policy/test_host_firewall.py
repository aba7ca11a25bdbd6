"""Host firewall with real packets: the seed's `host-firewall` CiliumClusterwideNetworkPolicy applied verbatim
selects the sandbox's worker nodes (label `node-role.kubernetes.io/worker: ""`) and guards each node's own
listeners (TCP 10250 and 22 in the node namespace, `sandbox/node_ports.py`) against pods, the other node and the
world; one node's host endpoint in audit mode (`endpoint config node:NAME PolicyAuditMode=Enabled`) lets its
would-be drops through as AUDIT flows; deleting the policy restores access.

Cilium's meaning, which the expectations follow: `fromEntities: [cluster]` = every pod, node and reserved
cluster identity, so 10250 answers pods and the other node but not the world; `fromCIDR: 10.0.0.0/8` selects
addresses outside the cluster's endpoints (CIDR identities), so pods (10.244.x, their own identities), the
other node (172.30.x) and the world (172.30.x.254) all lose 22. The node keeps what it opens itself (the world's
replies pass by conntrack) and its pods keep reaching the world (masqueraded through the node's address).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import orjson
import pytest
import yaml
from policy_workload import PodDef, Workload

from propolis_sandbox import cluster, probe
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.resources import documents_from
from propolis_sandbox.world import WORLD_HOST_IP

pytestmark = pytest.mark.root

SEED = "/work/shared/seed/cilium-deep-dive.txt"
KUBELET, SSH = 10250, 22


def seed_host_firewall() -> dict:
    """The seed's example, verbatim: its YAML runs from `apiVersion` to the first blank line."""
    text = open(SEED).read()
    match = re.search(r"apiVersion: cilium\.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata:\n  name: "
                      r"host-firewall\n.*?(?=\n\n)", text, re.S)
    assert match, f"no host-firewall policy in {SEED}"
    return yaml.safe_load(match.group(0))


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=2, services="all") as state:
        asyncio.run(cluster.wait(state, timeout=60))
        yield state


def status_text(state) -> str:
    proc = subprocess.run([sys.executable, "-m", "propolis.cli.main", "status"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PROPOLIS_SANDBOX_NAME": state.config["name"]})
    return proc.stdout


def cli(state, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "propolis.cli.main", *args, "-o", "json"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PROPOLIS_SANDBOX_NAME": state.config["name"]})
    assert proc.returncode == 0, proc.stderr
    return orjson.loads(proc.stdout)


def observe(state, *args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "propolis.cli.main", "observe", "-o", "json", *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PROPOLIS_SANDBOX_NAME": state.config["name"]})
    assert proc.returncode == 0, proc.stderr
    return [orjson.loads(line) for line in proc.stdout.splitlines() if line.strip()]


async def test_seed_host_firewall_guards_each_node_and_removing_it_restores_access(sandbox):
    cfg = sandbox.sandbox()
    node_ip = {n: cfg.node_ip(n) for n in (1, 2)}
    assert "Host firewall:" in status_text(sandbox) and "Enabled" in status_text(sandbox).split("Host firewall:")[1] \
        .splitlines()[0]
    workload = Workload(sandbox, "hostfw", {"a": {}}, [PodDef("a/pod1", 1, {"app": "p"}),
                                                       PodDef("a/pod2", 2, {"app": "p"})])
    async with workload as w:
        sources = {"pod on node 1": w.netns("a/pod1"), "pod on node 2": w.netns("a/pod2"),
                   "node 1": cfg.node_netns(1), "node 2": cfg.node_netns(2), "world": cfg.world_netns}

        def checks(policy: bool) -> list[tuple[str, int, int, bool]]:
            """(source, target node, port, expected) for every source towards each node it does not live on
            as itself (a node reaching its own address stays on loopback, outside any program)."""
            out = []
            for source in sources:
                for target in (1, 2):
                    if source == f"node {target}":
                        continue
                    out.append((source, target, KUBELET, not policy or source != "world"))
                    out.append((source, target, SSH, not policy))
            return out

        async def verify(label: str, policy: bool) -> list[str]:
            table = checks(policy)
            specs = [probe.ProbeSpec(sources[s], node_ip[t], port, "TCP", s, f"node {t}") for s, t, port, _ in table]
            specs.append(probe.ProbeSpec(cfg.node_netns(1), WORLD_HOST_IP, 80, "TCP", "node 1", "world"))
            specs.append(probe.ProbeSpec(w.netns("a/pod2"), WORLD_HOST_IP, 80, "TCP", "pod on node 2", "world"))
            expected = [e for *_, e in table] + [True, True]
            results = await probe.probe_all(specs, timeout=1.0)
            wrong = [f"[{label}] {r.spec.from_label} -> {r.spec.to_label}:{r.spec.port} expected "
                     f"{'allowed' if e else 'dropped'}, got {'connected' if r.connected else r.error or 'timeout'}"
                     for r, e in zip(results, expected) if r.connected != e]
            answered = {r.answered_by for r, e in zip(results, expected) if r.connected and r.spec.port in (KUBELET, SSH)}
            assert answered <= {f"node/{cfg.node_name(n)}" for n in (1, 2)}, answered
            return wrong

        assert await verify("no policy", policy=False) == []
        docs = documents_from("seed", [seed_host_firewall()])
        await cluster.apply_documents(sandbox, docs)
        await cluster.wait(sandbox, timeout=60)
        try:
            assert await verify("seed host-firewall", policy=True) == []
            drops = observe(sandbox, "--verdict", "DROPPED", "--type", "policy-verdict", "--to-port", str(SSH),
                            "--last", "200")
            assert {f["destination"].get("identity") for f in drops} == {1}, drops  # reserved:host
            assert {f["node_name"] for f in drops} == {cfg.node_name(1), cfg.node_name(2)}

            # audit mode on node 1's host endpoint: its would-be drops connect and are reported, node 2 still drops
            host1 = f"node:{cfg.node_name(1)}"
            assert cli(sandbox, "endpoint", "config", host1, "PolicyAuditMode=Enabled")["options"] == \
                {"PolicyAuditMode": "Enabled"}
            world_ssh = [probe.ProbeSpec(cfg.world_netns, node_ip[n], SSH, "TCP", "world", f"node {n}") for n in (1, 2)]
            assert [r.connected for r in await probe.probe_all(world_ssh, timeout=1.0)] == [True, False]
            audited = observe(sandbox, "--verdict", "AUDIT", "--to-port", str(SSH), "--last", "50")
            assert audited and {(f["node_name"], f["destination"].get("identity")) for f in audited} == \
                {(cfg.node_name(1), 1)}, audited
            assert cli(sandbox, "endpoint", "config", host1, "PolicyAuditMode=Disabled")["options"] == \
                {"PolicyAuditMode": "Disabled"}
            assert [r.connected for r in await probe.probe_all(world_ssh, timeout=1.0)] == [False, False]
        finally:
            await cluster.delete_documents(sandbox, docs)
            await cluster.wait(sandbox, timeout=60)
        assert await verify("policy deleted", policy=False) == []
