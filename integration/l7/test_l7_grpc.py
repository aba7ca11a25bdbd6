"""gRPC rules enforced stream by stream by the l7-proxy, with real packets between sandbox pods on two
nodes: the server pod answers gRPC on its port named `grpc` (a real grpcio server); a
CiliumNetworkPolicy lets the client call only `POST /grpc.health.v1.Health/Check`. Calls multiplexed
on one HTTP/2 connection are judged one by one: the allowed one reaches the server, the other gets
403 = PERMISSION_DENIED (for grpcio as for the sandbox's probe) and the connection stays up; the
denial is a Hubble L7 flow with protocol HTTP/2.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys

import pytest

from propolis_sandbox import cluster, grpc_echo, probe
from propolis_sandbox import netns as netns_mod
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.resources import documents_from

pytestmark = pytest.mark.root

CLIENT, SERVER, PORT = "grpc-demo/client", "grpc-demo/server", 50051
CHECK, SAY = grpc_echo.HEALTH_CHECK, f"/{grpc_echo.ECHO_SERVICE}/Say"


def workload(name: str) -> list[dict]:
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "", "namespace": "grpc-demo", "labels": {}},
           "spec": {"containers": [{"name": "c", "image": "echo", "ports": []}]}}
    client = json.loads(json.dumps(pod))
    client["metadata"].update(name="client", labels={"app": "client"})
    client["spec"]["nodeName"] = f"{name}-worker"
    server = json.loads(json.dumps(pod))
    server["metadata"].update(name="server", labels={"app": "server"})
    server["spec"]["nodeName"] = f"{name}-worker2"
    server["spec"]["containers"][0]["ports"] = [{"name": "grpc", "containerPort": PORT}]
    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "grpc-demo"}}, client, server]


POLICY = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
          "metadata": {"name": "server-grpc-health-only", "namespace": "grpc-demo"},
          "spec": {"endpointSelector": {"matchLabels": {"app": "server"}},
                   "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                                "toPorts": [{"ports": [{"port": str(PORT), "protocol": "TCP"}],
                                             "rules": {"http": [{"method": "POST", "path": CHECK}]}}]}]}}


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=2, services="all") as state:
        asyncio.run(_setup(state))
        yield state


async def _setup(state) -> None:
    await cluster.wait(state, timeout=60)
    await cluster.apply_documents(state, documents_from("grpc-workload", workload(state.config["name"])))
    await cluster.wait(state, timeout=60)


async def server_ip(state) -> str:
    async with cluster.Api(state.apiserver_url) as api:
        dest = await cluster.resolve_destination(api, SERVER, from_netns=cluster.source_netns(state, CLIENT))
    return dest.ip


async def grpc_probe(state, method: str) -> probe.ProbeResult:
    spec = probe.ProbeSpec(cluster.source_netns(state, CLIENT), await server_ip(state), PORT, grpc=method)
    return await probe.probe(spec, timeout=3.0)


async def multiplexed(state, calls: list[str]) -> list[grpc_echo.CallResult]:
    """Every call on its own stream of ONE connection from the client pod."""
    loop = asyncio.get_running_loop()
    ip = await server_ip(state)
    sock = netns_mod.socket_in(cluster.source_netns(state, CLIENT), socket.AF_INET, socket.SOCK_STREAM)
    await asyncio.wait_for(loop.sock_connect(sock, (ip, PORT)), 2)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        return await asyncio.wait_for(
            grpc_echo.unary_calls(reader, writer, f"{ip}:{PORT}", [(m, b"hello") for m in calls]), 10)
    finally:
        writer.close()


GRPCIO_CLIENT = """
import asyncio, json, sys
import grpc

async def main():
    async with grpc.aio.insecure_channel(sys.argv[1]) as channel:  # one channel: one HTTP/2 connection
        calls = [channel.unary_unary(path)(b"hello", timeout=5) for path in sys.argv[2:]]
        results = await asyncio.gather(*calls, return_exceptions=True)
    print(json.dumps([r.code().name if isinstance(r, grpc.aio.AioRpcError) else "OK" for r in results]))

asyncio.run(main())
"""


async def test_grpc_calls_are_judged_stream_by_stream(sandbox):
    # without a policy both methods answer (the server's own statuses)
    assert [(await grpc_probe(sandbox, m)).grpc_status for m in (CHECK, SAY)] == [grpc_echo.OK, grpc_echo.OK]
    docs = documents_from("grpc-policy", [POLICY])
    await cluster.apply_documents(sandbox, docs)
    await cluster.wait(sandbox, timeout=60)
    check, say = await grpc_probe(sandbox, CHECK), await grpc_probe(sandbox, SAY)
    assert (check.connected, check.grpc_status) == (True, grpc_echo.OK)
    assert (say.connected, say.http_status, say.grpc_status) == (True, 403, grpc_echo.PERMISSION_DENIED)

    # multiplexed on one connection: each stream on its own, the connection stays up for the others
    results = await multiplexed(sandbox, [SAY, CHECK, SAY, CHECK])
    assert [r.grpc_status for r in results] == [grpc_echo.PERMISSION_DENIED, grpc_echo.OK] * 2
    assert results[1].reply == grpc_echo.SERVING  # answered by the server itself

    # a real gRPC client (grpcio, in the client pod's namespace) reads the 403 as PERMISSION_DENIED
    argv = netns_mod.netns_exec_argv(cluster.source_netns(sandbox, CLIENT),
                                     [sys.executable, "-c", GRPCIO_CLIENT, f"{await server_ip(sandbox)}:{PORT}",
                                      CHECK, SAY, CHECK])
    proc = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["OK", "PERMISSION_DENIED", "OK"]

    # the CLI
    proc = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "propolis.cli.main", "sandbox", "probe", "--name", sandbox.config["name"], CLIENT,
        SERVER, "--port", str(PORT), "--grpc", SAY, "-o", "json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["connected"], out["grpc_status"]) == (True, grpc_echo.PERMISSION_DENIED)

    # the denial as Hubble shows it: an L7 flow, HTTP/2, 403, DROPPED
    proc = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "propolis.cli.main", "observe", "--name", sandbox.config["name"], "--protocol", "http",
        "--http-status", "403", "--last", "100", "-o", "json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    flows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    flows = [f.get("flow", f) for f in flows]
    denied = [f for f in flows if f["l7"]["http"]["url"].endswith(SAY)]
    assert denied and all(f["verdict"] == "DROPPED" and f["Type"] == "L7" for f in denied)
    assert denied[0]["l7"]["http"]["protocol"] == "HTTP/2" and denied[0]["l7"]["http"]["method"] == "POST"
    assert denied[0]["source"]["pod_name"] == "client" and denied[0]["destination"]["pod_name"] == "server"
