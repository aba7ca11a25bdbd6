"""HostPort (issue 19) through the whole suite: a pod's `hostPort` -> a HostPort LB frontend on its own node's
InternalIP -> real connections from another node's namespace and from a pod are answered by that pod; a second
pod of the node claiming the same hostPort/protocol is reported (datapath-writer progress `service_errors`,
naming the pod) and not installed; deleting the pod removes the frontend."""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
import time

import pytest

from propolis.runtime.heartbeats import newest, read_heartbeats
from propolis_sandbox import cluster, probe
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.resources import KINDS, documents_from

pytestmark = pytest.mark.root
NS = "hostport-test"
HOST_PORT = 18080


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=2, services="all") as state:
        yield state


def pod(name: str, node: str, host_port: int | None = None) -> dict:
    port = {"name": "http", "containerPort": 8080, "protocol": "TCP"}
    if host_port:
        port["hostPort"] = host_port
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "echo", "ports": [port]}]}}


async def answered(source_netns: str, ip: str, port: int, count: int) -> collections.Counter:
    specs = [probe.ProbeSpec(source_netns, ip, port, "TCP") for _ in range(count)]
    results = await probe.probe_all(specs, timeout=2.0, concurrency=4)
    return collections.Counter(r.answered_by or "none" for r in results)


def frontends(node: str) -> dict[str, list[str]]:
    proc = subprocess.run([sys.executable, "-m", "propolis.cli.main", "service", "list", "--node", node, "-o", "json"],
                          capture_output=True, text=True, timeout=30, check=True)
    return {s["frontend"]: s for s in json.loads(proc.stdout)}


async def service_errors(state, node: str) -> dict:
    bus = state.admin_bus("hostport-test-beats")
    await bus.connect(max_wait=5)
    try:
        hb = newest(await read_heartbeats(bus), "datapath-writer", node)
    finally:
        await bus.close()
    return (hb.progress.get("service_errors") or {}) if hb else {}


async def wait_for(what: str, check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.3)
    raise AssertionError(f"{what} not seen within {timeout:.0f}s (last: {last!r})")


async def test_hostport_reachable_conflict_reported_and_removed(sandbox):
    n1, n2 = sandbox.nodes[0], sandbox.nodes[1]
    cfg = sandbox.sandbox()
    ip1 = n1["internal_ip"]
    first = documents_from(NS, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
                                pod("web", n1["name"], HOST_PORT), pod("client", n2["name"])])
    second = documents_from(NS, [pod("web-late", n1["name"], HOST_PORT)])
    await cluster.apply_documents(sandbox, first)
    try:
        await cluster.wait_running(sandbox, 2, namespace=NS)
        await cluster.wait(sandbox)
        fe = f"{ip1}:{HOST_PORT}"
        row = frontends(n1["name"]).get(fe)
        assert row is not None and "HostPort" in row["flags"], frontends(n1["name"])
        assert not [f for f in frontends(n2["name"]) if f.endswith(f":{HOST_PORT}")]  # only on the pod's node

        # from the other node's own namespace, and from a pod on the other node (via the underlay, the
        # device program), and from a pod on the same node (the pod path's service lookup)
        assert await answered(cfg.node_netns(2), ip1, HOST_PORT, 5) == {f"{NS}/web": 5}
        assert await answered(cfg.pod_netns(NS, "client"), ip1, HOST_PORT, 5) == {f"{NS}/web": 5}
        cli = subprocess.run([sys.executable, "-m", "propolis.cli.main", "sandbox", "probe", "--name",
                              sandbox.config["name"], f"node:{n2['name']}", f"node:{n1['name']}", "--port",
                              str(HOST_PORT), "-o", "json"], capture_output=True, text=True, timeout=30)
        assert cli.returncode == 0 and f"{NS}/web" in cli.stdout, cli.stdout + cli.stderr

        # a second pod of node 1 claiming the same hostPort/TCP: reported by name, not installed
        await cluster.apply_documents(sandbox, second)
        await cluster.wait_running(sandbox, 3, namespace=NS)
        await cluster.wait(sandbox)
        errors = await wait_for("the conflict in the writer's progress",
                                lambda: service_errors(sandbox, n1["name"]))
        assert f"Pod {NS}/web-late" in errors and f"{NS}/web" in errors[f"Pod {NS}/web-late"], errors
        assert f"Pod {NS}/web" not in errors, errors
        assert await answered(cfg.pod_netns(NS, "web-late"), ip1, HOST_PORT, 5) == {f"{NS}/web": 5}

        # deleting the holder: the late pod is now the only claimant and gets the port
        async with cluster.Api(sandbox.apiserver_url) as api:
            await api.request("DELETE", KINDS["Pod"].path(NS, "web"))
        await cluster.wait(sandbox)
        assert await answered(cfg.node_netns(2), ip1, HOST_PORT, 5) == {f"{NS}/web-late": 5}
        assert f"Pod {NS}/web-late" not in await service_errors(sandbox, n1["name"])

        # deleting the last claimant removes the frontend; nothing answers there any more
        async with cluster.Api(sandbox.apiserver_url) as api:
            await api.request("DELETE", KINDS["Pod"].path(NS, "web-late"))
        await cluster.wait(sandbox)
        assert fe not in frontends(n1["name"])
        assert await answered(cfg.node_netns(2), ip1, HOST_PORT, 2) == {"none": 2}
    finally:
        await cluster.delete_documents(sandbox, first + second)
