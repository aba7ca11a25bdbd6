"""`propolis bench l7`: the same client pod to the same server pod, in one run, (a) under an L4-only policy
(direct) and (b) through the l7-proxy under rules that allow the requests — HTTP/1.1 and gRPC.

One sandbox, client pod on node 1, server pod on node 2 (the proxy judging ingress runs on node 2).
HTTP: a keep-alive server of this process in the server pod's namespace (`GET /bench` -> `200 ok`);
gRPC: the pod's own grpcio server (`/grpc.health.v1.Health/Check`). Load: this process's asyncio
clients in the client pod's namespace (so Python's cost on both ends is in both runs alike).
Figures per protocol and mode: requests/s with keep-alive on 1 and 50 connections, latency p50/p99
at a paced rate (the proxy's added latency = proxied - direct), the node's proxy CPU per 1,000
requests and its RSS idle and after. Anchor: Envoy with L7 policy keeps 11-14 % of direct throughput
(an independent TKE test). Goal: >= 25 % of direct requests/s, added p50 < 1 ms, p99 < 5 ms at
1,000 req/s, idle RSS < 60 MB.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from propolis.l7 import http
from propolis_sandbox import cluster, grpc_echo
from propolis_sandbox.bench.common import percentile, rss_mb, versions
from propolis_sandbox.config import SandboxState
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.netns import socket_in
from propolis_sandbox.resources import documents_from

NAMESPACE = "bench-l7"
HTTP_PORT, GRPC_PORT = 8081, 50051
HTTP_PATH, GRPC_PATH = "/bench", grpc_echo.HEALTH_CHECK
HTTP_REQUEST = f"GET {HTTP_PATH} HTTP/1.1\r\nHost: server\r\n\r\n".encode()
HTTP_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

Call = Callable[[], Awaitable[bool]]  # one request on a connection: True = answered as allowed


def _manifest(n1: str, n2: str) -> list[dict[str, Any]]:
    def pod(name: str, node: str, ports: list[dict[str, Any]]) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": name}},
                "spec": {"nodeName": node, "containers": [{"name": name, "image": "echo", "ports": ports}]}}
    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
            pod("client", n1, []), pod("server", n2, [{"name": "grpc", "containerPort": GRPC_PORT}])]


def _policy(l7: bool) -> dict[str, Any]:
    """Client -> server on both ports; with `l7`, rules that allow exactly the benchmark's requests."""
    to_ports: list[dict[str, Any]] = [{"ports": [{"port": str(HTTP_PORT), "protocol": "TCP"}]},
                {"ports": [{"port": str(GRPC_PORT), "protocol": "TCP"}]}]
    if l7:
        to_ports[0]["rules"] = {"http": [{"method": "GET", "path": HTTP_PATH}]}
        to_ports[1]["rules"] = {"http": [{"method": "POST", "path": GRPC_PATH}]}
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "bench-l7", "namespace": NAMESPACE},
            "spec": {"endpointSelector": {"matchLabels": {"app": "server"}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}], "toPorts": to_ports}]}}


async def _http_server(netns: str) -> asyncio.AbstractServer:
    """A keep-alive HTTP/1.1 server in the server pod's namespace: every request -> `200 ok`."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = http.MessageStream()
        try:
            while data := await reader.read(65536):
                writer.write(b"".join(HTTP_RESPONSE for kind, _ in stream.feed(data) if kind == "end"))
        except (ConnectionError, http.BadMessage, http.HeaderTooLarge):
            pass
        finally:
            writer.close()

    sock = socket_in(netns, socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("0.0.0.0", HTTP_PORT))
    return await asyncio.start_server(serve, sock=sock, backlog=512)


async def _connect(netns: str, ip: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket_in(netns, socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # asyncio skips sockets of proto 0
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (ip, port)), 5)
    return await asyncio.open_connection(sock=sock)


async def _http_client(netns: str, ip: str, path: str = HTTP_PATH) -> tuple[Call, Callable[[], None]]:
    reader, writer = await _connect(netns, ip, HTTP_PORT)
    request = HTTP_REQUEST.replace(HTTP_PATH.encode(), path.encode(), 1)
    stream = http.MessageStream(response=True)

    async def call() -> bool:
        writer.write(request)
        status = 0
        while True:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("the server closed the benchmark connection")
            for kind, value in stream.feed(data):
                if kind == "head":
                    status = value.status
                elif kind == "end":
                    return status == 200
    return call, writer.close


async def _grpc_client(netns: str, ip: str, path: str = GRPC_PATH) -> tuple[Call, Callable[[], None]]:
    reader, writer = await _connect(netns, ip, GRPC_PORT)
    client = grpc_echo.GrpcClient(reader, writer, f"{ip}:{GRPC_PORT}")

    async def call() -> bool:
        return (await client.call(path)).grpc_status == grpc_echo.OK
    return call, client.close


Client = Callable[..., Awaitable[tuple[Call, Callable[[], None]]]]


async def _throughput(make: Client, netns: str, ip: str, connections: int, seconds: float) -> float:
    clients = [await make(netns, ip) for _ in range(connections)]
    done = 0
    stop_at = time.monotonic() + seconds

    async def loop(call: Call) -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            if not await call():
                raise RuntimeError("a benchmark request was not answered 200/OK")
            done += 1

    started = time.monotonic()
    try:
        await asyncio.gather(*(loop(call) for call, _ in clients))
    finally:
        for _, close in clients:
            close()
    return done / (time.monotonic() - started)


async def _paced(make: Client, netns: str, ip: str, rate: int, seconds: float, proxy_pid: int) -> dict[str, Any]:
    """`rate` requests/s on a pool of connections, each timed from its send; the proxy's CPU meanwhile."""
    pool: asyncio.Queue[Call] = asyncio.Queue()
    clients = [await make(netns, ip) for _ in range(20)]
    for call, _ in clients:
        pool.put_nowait(call)
    latencies: list[float] = []

    async def one() -> None:
        call = await pool.get()
        t0 = time.perf_counter()
        ok = await call()
        latencies.append((time.perf_counter() - t0) * 1e3)
        pool.put_nowait(call)
        if not ok:
            raise RuntimeError("a benchmark request was not answered 200/OK")

    total = int(rate * seconds)
    cpu0 = _cpu_seconds(proxy_pid)
    started = time.monotonic()
    tasks = []
    for i in range(total):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    cpu = _cpu_seconds(proxy_pid) - cpu0
    for _, close in clients:
        close()
    return {"rate": rate, "achieved_rps": round(total / elapsed), "p50_ms": round(percentile(latencies, 50), 3),
            "p99_ms": round(percentile(latencies, 99), 3),
            "proxy_cpu_ms_per_1000_requests": round(cpu * 1e3 / total * 1000, 1)}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(make: Client, netns: str, ip: str, opt: dict[str, Any], proxy_pid: int) -> dict[str, Any]:
    return {"rps_1_connection": round(await _throughput(make, netns, ip, 1, opt["seconds"])),
            "rps_50_connections": round(await _throughput(make, netns, ip, 50, opt["seconds"])),
            "paced": await _paced(make, netns, ip, opt["rate"], opt["seconds"], proxy_pid)}


async def _bench(state: SandboxState, opt: dict[str, Any]) -> dict[str, Any]:
    cfg = state.sandbox()
    n1, n2 = cfg.node_names()
    await cluster.wait(state, timeout=60)
    await cluster.apply_documents(state, documents_from("bench l7", _manifest(n1, n2)))
    await cluster.wait_running(state, 2, namespace=NAMESPACE)
    server_ip = str((await cluster.get(state, "pods", f"{NAMESPACE}/server"))["status"]["podIP"])
    client_netns, server_netns = cfg.pod_netns(NAMESPACE, "client"), cfg.pod_netns(NAMESPACE, "server")
    proxy_pid = next(s["pid"] for s in cluster.require_state(state.config["name"]).services
                     if s["name"] == "l7-proxy" and s["node"] == n2)
    server = await _http_server(server_netns)
    results: dict[str, Any] = {"proxy_idle_rss_mb": round(rss_mb(proxy_pid), 1)}
    try:
        for mode, l7 in (("direct", False), ("proxy", True)):
            await cluster.apply_documents(state, documents_from("bench l7 policy", [_policy(l7)]))
            await cluster.wait(state, timeout=60)
            # through the proxy exactly when the rules apply: a request they do not allow is refused
            denied_http, close = await _http_client(client_netns, server_ip, "/not-allowed")
            denied_grpc, close_grpc = await _grpc_client(client_netns, server_ip, f"/{grpc_echo.ECHO_SERVICE}/Say")
            results[f"{mode}_judged_by_proxy"] = not await denied_http() and not await denied_grpc()
            close()
            close_grpc()
            for protocol, make in (("http", _http_client), ("grpc", _grpc_client)):
                results.setdefault(protocol, {})[mode] = await _measure(make, client_netns, server_ip, opt, proxy_pid)
    finally:
        server.close()
    results["proxy_rss_after_mb"] = round(rss_mb(proxy_pid), 1)
    for protocol in ("http", "grpc"):
        d, p = results[protocol]["direct"], results[protocol]["proxy"]
        results[protocol]["proxy_share_of_direct_rps"] = {
            n: round(p[f"rps_{n}"] / d[f"rps_{n}"], 3) for n in ("1_connection", "50_connections")}
        results[protocol]["added_ms"] = {q: round(p["paced"][q] - d["paced"][q], 3) for q in ("p50_ms", "p99_ms")}
    return results


def run(seconds: float = 5.0, rate: int = 1000) -> dict[str, Any]:
    with running_sandbox(nodes=2, services="all") as state:
        results = asyncio.run(_bench(state, {"seconds": seconds, "rate": rate}))
    return {**results, "versions": {**versions(), **{p: metadata.version(p) for p in ("h2", "grpcio", "httptools")}},
            "goal": ">= 25 % of direct rps, added p50 < 1 ms and p99 < 5 ms at 1,000 req/s, proxy idle RSS < 60 MB",
            "anchor": "Envoy with L7 policy keeps 11-14 % of direct throughput (independent TKE test)"}
