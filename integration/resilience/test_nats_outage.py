"""Fail closed through a NATS outage: while the bus is frozen and then killed, the kernel keeps enforcing
the last policy (allowed stays allowed, denied stays denied, even when the policy is deleted meanwhile);
after the sandbox restarts nats-server on the same port and store, the change that waited takes effect."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from propolis_sandbox import cluster, probe
from propolis_sandbox.config import load_state
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.resources import KINDS, documents_from

pytestmark = pytest.mark.root
NS = "outage"


def workload(node: str) -> list[dict]:
    def pod(name: str) -> dict:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "echo",
                                                           "ports": [{"containerPort": 8080}]}]}}

    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
            pod("server"), pod("client"), pod("other"),
            {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
             "metadata": {"name": "server-from-client", "namespace": NS},
             "spec": {"endpointSelector": {"matchLabels": {"app": "server"}},
                      "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                                   "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]}}]


async def verdicts(state, server_ip: str) -> tuple[bool, bool]:
    cfg = state.sandbox()
    client, other = await probe.probe_all([probe.ProbeSpec(cfg.pod_netns(NS, "client"), server_ip, 8080),
                                           probe.ProbeSpec(cfg.pod_netns(NS, "other"), server_ip, 8080)],
                                          timeout=1.0)
    return client.connected, other.connected


async def test_policy_holds_through_a_nats_outage_and_changes_apply_after():
    with running_sandbox(nodes=1, services="all") as state:
        await cluster.apply_documents(state, documents_from("outage", workload(state.nodes[0]["name"])))
        server_ip = (await cluster.wait_running(state, 3, namespace=NS))[f"{NS}/server"]
        await cluster.wait(state)
        assert await verdicts(state, server_ip) == (True, False)

        # 1. the bus hangs (nobody can read or write KV) and the policy is deleted meanwhile: nothing opens
        nats_pid = state.nats_pid
        os.kill(nats_pid, signal.SIGSTOP)
        try:
            async with cluster.Api(state.apiserver_url) as api:
                await api.request("DELETE", KINDS["CiliumNetworkPolicy"].path(NS, "server-from-client"))
            for _ in range(4):
                assert await verdicts(state, server_ip) == (True, False)
                await asyncio.sleep(0.5)
        finally:
            os.kill(nats_pid, signal.SIGKILL)  # then it dies; the sandbox restarts it on the same port and store
        nats_pid = await restarted_nats(state, nats_pid)
        await cluster.wait(state, timeout=60)
        assert await verdicts(state, server_ip) == (True, True)  # the deletion that waited took effect

        # 2. with the policy back, nats-server dies and restarts: enforcement holds throughout
        await cluster.apply_documents(state, documents_from("outage", workload(state.nodes[0]["name"])[-1:]))
        await cluster.wait(state)
        assert await verdicts(state, server_ip) == (True, False)
        os.kill(nats_pid, signal.SIGKILL)
        for _ in range(5):
            assert await verdicts(state, server_ip) == (True, False)
        await restarted_nats(state, nats_pid)
        await cluster.wait(state, timeout=60)
        assert await verdicts(state, server_ip) == (True, False)


async def restarted_nats(state, old_pid: int) -> int:
    for _ in range(100):
        current = load_state(state.config["name"])
        if current is not None and current.nats_pid not in (0, old_pid):
            return current.nats_pid
        await asyncio.sleep(0.1)
    pytest.fail("nats-server was not restarted")
