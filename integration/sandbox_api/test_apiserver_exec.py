"""`pods/exec` of the sandbox API server driven by the product's kubeconfig cluster (`connectivity/kube.py`,
kubernetes-asyncio's WsApiClient): the command runs in the pod's network namespace, stdout and stderr come
back on their channels, a non-zero exit is a Failure naming the code; the probe and echo programs the
connectivity test sends to a real cluster work end to end there; the pods it creates are accepted."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from propolis.connectivity import echo as echo_program
from propolis.connectivity.cluster import Probe
from propolis.connectivity.kube import ExecFailed, KubeCluster
from propolis.connectivity.runner import workload
from propolis.connectivity.scenarios import NAMESPACE
from propolis.errors import CliError
from propolis_sandbox.api_exec import ExecTarget
from propolis_sandbox.apiserver import ApiServer
from propolis_sandbox.netns import create_netns, delete_netns
from propolis_sandbox.testing.tools import required_tool

pytestmark = pytest.mark.root

NETNS = f"pp-exectest-{os.getpid()}"
NO_BUS = ("nats://127.0.0.1:1", None, None)  # exec needs no bus; nothing here waits on heartbeats


@pytest.fixture
def pod_netns() -> Iterator[str]:
    create_netns(NETNS)
    try:
        yield NETNS
    finally:
        delete_netns(NETNS)


@pytest.fixture
async def kube(tmp_path: Path, pod_netns: str) -> AsyncIterator[tuple[ApiServer, KubeCluster]]:
    """An API server whose every pod lives in ``pod_netns``, one Node, and the product's cluster on it."""
    async with ApiServer(run_dir=tmp_path / "run", exec_target=lambda pod: ExecTarget(pod_netns)) as srv:
        async with aiohttp.ClientSession() as http:
            node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
                    "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}}
            async with http.post(f"{srv.url}/api/v1/nodes", json=node) as resp:
                assert resp.status == 201, await resp.text()
        cluster = await KubeCluster.open(str(srv.kubeconfig_path), NO_BUS)
        try:
            yield srv, cluster
        finally:
            await cluster.close()


async def running(cluster: KubeCluster, names: list[str]) -> None:
    for name in names:
        await cluster.request("PATCH", f"/api/v1/namespaces/{NAMESPACE}/pods/{name}/status",
                              {"status": {"phase": "Running", "podIP": "10.0.0.2"}},
                              content_type="application/merge-patch+json")


async def test_the_workload_manifests_are_accepted_and_exec_runs_in_the_pod_netns(
        kube: tuple[ApiServer, KubeCluster]) -> None:
    _, cluster = kube
    assert [n.name for n in cluster.nodes] == ["node-1"] and cluster.nodes[0].internal_ip == "192.0.2.1"
    await cluster.apply(workload(cluster))  # echo pods: command, downward-API env, readiness probe
    await cluster.apply(workload(cluster))  # again: replaced, not refused
    await running(cluster, ["client", "client2", "echo-same-node", "echo-other-node"])
    assert sorted(await cluster.wait_running(NAMESPACE, 4, timeout=5)) == [
        "client", "client2", "echo-other-node", "echo-same-node"]
    echo = (await cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods/echo-same-node"))["spec"]
    assert echo["containers"][0]["command"][:2] == ["python3", "-c"]
    assert set(await cluster.services(NAMESPACE)) == {"echo-same-node", "echo-other-node"}

    interfaces = await cluster.exec("client", ["python3", "-c", "import socket; print(socket.if_nameindex())"],
                                    timeout=10)
    assert interfaces.strip() == "[(1, 'lo')]"  # the fresh pod namespace, not the host's interfaces
    with pytest.raises(ExecFailed, match=r"exit code 3.*stderr: oops"):
        await cluster.exec("client", ["sh", "-c", "echo partial; echo oops >&2; exit 3"], timeout=10)
    with pytest.raises(ExecFailed, match="404"):
        await cluster.exec("host-netns-1", ["true"], timeout=10)  # no such pod yet
    await cluster.delete_namespace(NAMESPACE, timeout=10)


async def test_probes_and_the_echo_program_through_exec(kube: tuple[ApiServer, KubeCluster]) -> None:
    _, cluster = kube
    await cluster.apply(workload(cluster)[:3])  # the namespace and the client pods
    with pytest.raises(ExecFailed, match="400"):
        await cluster.exec("client", ["true"], timeout=10)  # not running yet: no IP
    await running(cluster, ["client"])
    echo = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", NETNS, sys.executable, "-c", Path(echo_program.__file__).read_text(), "8080", "5353",
        env={**os.environ, "POD_NAMESPACE": NAMESPACE, "POD_NAME": "echo"})
    try:
        for _ in range(100):  # until it listens
            ready = await cluster.probe_all([Probe("client", "127.0.0.1", 8080)], timeout=1)
            if ready[0].connected:
                break
            await asyncio.sleep(0.05)
        tcp, udp, http, closed = await cluster.probe_all(
            [Probe("client", "127.0.0.1", 8080), Probe("client", "127.0.0.1", 5353, "UDP"),
             Probe("client", "127.0.0.1", 8080, http=("GET", "/public")), Probe("client", "127.0.0.1", 9)],
            timeout=2)
    finally:
        echo.kill()
        await echo.wait()
    assert tcp.connected and tcp.answered_by == f"{NAMESPACE}/echo"
    assert udp.connected and udp.answered_by == f"{NAMESPACE}/echo"
    assert http.connected and http.http_status == 200
    assert not closed.connected and closed.error == "Connection refused"
    assert await cluster.resolve("client", "localhost") == ["127.0.0.1"]
    with pytest.raises(CliError, match="does not resolve"):
        await cluster.resolve("client", "no-such-name.invalid")


async def test_kubectl_exec(kube: tuple[ApiServer, KubeCluster]) -> None:
    """kubectl speaks v5.channel.k8s.io: the pod's interfaces come back, and its exit code is kubectl's."""
    srv, cluster = kube
    await cluster.apply(workload(cluster)[:2])
    await running(cluster, ["client"])
    proc = await asyncio.create_subprocess_exec(
        required_tool("kubectl"), "--kubeconfig", str(srv.kubeconfig_path), "exec", "-n", NAMESPACE, "client", "--",
        "sh", "-c", "ip -o link | cut -d: -f2; exit 4", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert (proc.returncode, out.decode().split()) == (4, ["lo"]), err.decode()
    assert "command terminated with exit code 4" in err.decode()
