"""Fail-open scenario 1 of issue 11, the API-server half: the sandbox API server is killed (SIGKILL) in a
2-node sandbox with policies and a Service while every allowed and denied pair is probed every 150 ms. The
supervisor restarts it on the SAME URL with the SAME store (resourceVersion never goes back, every object and
uid is still there); the k8s-watcher is then killed too (its restart used to mirror an empty API and prune
every policy), a pod is added through the restarted API, and not one denied connection gets through."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest

from propolis_sandbox import cluster, probe
from propolis_sandbox.config import load_state
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.resources import KINDS, documents_from

pytestmark = pytest.mark.root
NS = "apikill"
PROBE_EVERY_S = 0.15


def pod(name: str, node: str, app: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "echo",
                                                       "ports": [{"containerPort": 8080}]}]}}


def workload(node1: str, node2: str) -> list[dict]:
    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
            pod("server", node1, "server"), pod("client", node2, "client"),
            pod("other", node1, "other"), pod("other2", node2, "other"),
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "server", "namespace": NS},
             "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": 8080}]}},
            {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "server-ingress", "namespace": NS},
             "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
                      "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                   "ports": [{"port": 8080, "protocol": "TCP"}]}]}},
            {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
             "metadata": {"name": "server-from-client", "namespace": NS},
             "spec": {"endpointSelector": {"matchLabels": {"app": "server"}},
                      "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                                   "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]}}]


class ProbeLoop:
    """Allowed and denied pairs probed every PROBE_EVERY_S until stopped; denied connections are recorded."""

    def __init__(self, state, server_ip: str) -> None:
        cfg = state.sandbox()
        self.allowed = [probe.ProbeSpec(cfg.pod_netns(NS, "client"), server_ip, 8080, from_label="client")]
        self.denied = [probe.ProbeSpec(cfg.pod_netns(NS, name), server_ip, 8080, from_label=name)
                       for name in ("other", "other2")]
        self.rounds = 0
        self.allowed_failed: list[str] = []
        self.denied_connected: list[str] = []
        self.stop = asyncio.Event()

    def add_denied(self, spec: probe.ProbeSpec) -> None:
        self.denied.append(spec)

    async def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            results = await probe.probe_all(self.allowed + self.denied, timeout=1.0)
            for spec, result in zip(self.allowed + self.denied, results):
                if spec in self.denied and result.connected:
                    self.denied_connected.append(f"{spec.from_label} at {time.strftime('%X')}")
                elif spec in self.allowed and not result.connected:
                    self.allowed_failed.append(f"{spec.from_label} at {time.strftime('%X')}: {result.error}")
            self.rounds += 1
            await asyncio.sleep(max(0.0, PROBE_EVERY_S - (time.monotonic() - started)))


async def objects(state) -> dict[str, str]:
    """kind/ns/name -> uid of everything the workload created."""
    found = {}
    async with cluster.Api(state.apiserver_url) as api:
        for kind in ("Pod", "Service", "NetworkPolicy", "CiliumNetworkPolicy"):
            for item in (await api.list(KINDS[kind], NS))["items"]:
                found[f"{kind}/{item['metadata']['name']}"] = item["metadata"]["uid"]
    return found


async def restarted(name: str, field: str, old_pid: int, service: str = "") -> int:
    for _ in range(200):
        current = load_state(name)
        pid = getattr(current, field) if not service else \
            next((s["pid"] for s in current.services if s["name"] == service), 0)
        if pid not in (0, old_pid):
            return pid
        await asyncio.sleep(0.1)
    pytest.fail(f"{service or field} was not restarted")


async def answers(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    pytest.fail(f"the API server does not answer on {url} after its restart")


async def test_apiserver_sigkill_keeps_url_store_and_enforcement():
    with running_sandbox(nodes=2, services="all") as state:
        name = state.config["name"]
        node1, node2 = (n["name"] for n in state.nodes)
        await cluster.wait(state, timeout=60)
        await cluster.apply_documents(state, documents_from("apikill", workload(node1, node2)))
        ips = await cluster.wait_running(state, 4, namespace=NS)
        await cluster.wait(state, timeout=60)
        loop = ProbeLoop(state, ips[f"{NS}/server"])
        first = await probe.probe_all(loop.allowed + loop.denied, timeout=1.0)
        assert [r.connected for r in first] == [True, False, False], "policy not enforced before the fault"

        before = await objects(state)
        async with cluster.Api(state.apiserver_url) as api:
            rv_before = int(await api.resource_version())
        runner = asyncio.create_task(loop.run())
        try:
            os.kill(state.apiserver_pid, signal.SIGKILL)
            await restarted(name, "apiserver_pid", state.apiserver_pid)
            after_state = load_state(name)
            assert after_state.apiserver_url == state.apiserver_url  # same address, nothing to re-point
            await answers(state.apiserver_url)
            async with cluster.Api(state.apiserver_url) as api:
                assert int(await api.resource_version()) >= rv_before  # never back
            assert await objects(state) == before  # every object, same uids

            # the k8s-watcher restarts against the restarted API (this used to mirror an empty store)
            watcher_pid = next(s["pid"] for s in after_state.services if s["name"] == "k8s-watcher")
            os.kill(watcher_pid, signal.SIGKILL)
            await restarted(name, "", watcher_pid, service="k8s-watcher")
            await cluster.wait(load_state(name), timeout=60)

            # the restarted API drives the cluster: a new pod is scheduled, wired and denied like its peers
            await cluster.apply_documents(state, documents_from("apikill", [pod("late", node2, "other")]))
            late_ip = await cluster.wait_running(state, 5, namespace=NS)
            assert f"{NS}/late" in late_ip
            loop.add_denied(probe.ProbeSpec(state.sandbox().pod_netns(NS, "late"), ips[f"{NS}/server"], 8080,
                                            from_label="late"))
            await cluster.wait(load_state(name), timeout=60)
            await asyncio.sleep(2.0)  # more probe rounds with everything restarted
        finally:
            loop.stop.set()
            await runner
        assert loop.rounds >= 10
        assert loop.denied_connected == [], f"denied connections got through: {loop.denied_connected}"
        assert loop.allowed_failed == [], f"allowed connections failed: {loop.allowed_failed}"
