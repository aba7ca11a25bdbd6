"""The seed's `api-l7-policy` (demo manifest, applied verbatim) enforced request by request by the l7-proxy,
with real packets between sandbox pods on two nodes: the datapath redirects frontend -> api:8080 to the
api node's proxy, which answers denied requests 403 and forwards allowed ones with the client's address.

Killing the proxy fails closed (redirected connections are dropped, never forwarded unfiltered) and a
restarted proxy serves new connections within a second of listening again.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from propolis.policy.proxy_ports import PROXY_PORTS
from propolis_sandbox import cluster, demo, probe
from propolis_sandbox import netns as netns_mod
from propolis_sandbox.config import load_state
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.resources import documents_from

pytestmark = pytest.mark.root

MANIFESTS = Path(demo.__file__).parent / "manifests"
FRONTEND, API, OUTSIDER = "production/frontend", "production/api", "default/outsider"


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=2, services="all") as state:
        asyncio.run(_setup(state))
        yield state


async def _setup(state) -> None:
    await cluster.wait(state, timeout=60)
    await cluster.apply(state, [str(MANIFESTS / "10-app.yaml")])
    await cluster.wait(state, timeout=60)
    await cluster.apply(state, [str(MANIFESTS / "30-api-l7-policy.yaml")])
    await cluster.wait(state, timeout=60)


async def _api_ip(state) -> str:
    async with cluster.Api(state.apiserver_url) as api:
        dest = await cluster.resolve_destination(api, API, from_netns=cluster.source_netns(state, FRONTEND))
    return dest.ip


async def _ip(state, pod: str) -> str:
    async with cluster.Api(state.apiserver_url) as api:
        dest = await cluster.resolve_destination(api, pod, from_netns=cluster.source_netns(state, FRONTEND))
    return dest.ip


async def http(state, source: str, method: str, path: str, timeout: float = 2.0, *, to: str = API,
               port: int = 8080) -> probe.ProbeResult:
    spec = probe.ProbeSpec(cluster.source_netns(state, source), await _ip(state, to), port, http=(method, path))
    return await probe.probe(spec, timeout=timeout)


async def raw_exchange(state, data: bytes, *, pause_after: int = 0) -> bytes:
    """Send raw bytes from the frontend to api:8080, return everything answered until the close."""
    loop = asyncio.get_running_loop()
    sock = netns_mod.socket_in(cluster.source_netns(state, FRONTEND), socket.AF_INET, socket.SOCK_STREAM)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (await _api_ip(state), 8080)), 2)
        await loop.sock_sendall(sock, data)
        received = b""
        while True:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
            if not chunk:
                return received
            received += chunk
    finally:
        sock.close()


async def test_seed_api_l7_policy_request_by_request(sandbox):
    expected = [("GET", "/api/v1/users", 200), ("GET", "/api/v1/health", 200), ("POST", "/api/v1/users", 200),
                ("DELETE", "/api/v1/users", 403), ("POST", "/api/v1/products", 403),
                ("GET", "/api/v1/products", 403),  # not in the seed's rules
                ("GET", "/api/v1/users/1", 403),  # path is an anchored full match
                ("GET", "/api/v1/users?x=1", 403)]  # ... on the request target, query included (Envoy's :path)
    got = []
    for method, path, _ in expected:
        res = await http(sandbox, FRONTEND, method, path)
        got.append((method, path, res.http_status))
    assert got == expected
    # L3/L4 still decides first: the outsider does not even connect
    res = await http(sandbox, OUTSIDER, "GET", "/api/v1/users", timeout=0.75)
    assert not res.connected
    # the denial is an L7 flow, as Hubble shows it
    proc = subprocess.run([sys.executable, "-m", "propolis.cli.main", "observe", "--name", sandbox.config["name"],
                           "--protocol", "http", "--http-status", "403", "--last", "50", "-o", "json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    flows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    flows = [f.get("flow", f) for f in flows]
    denied = [f for f in flows if f["l7"]["http"]["method"] == "DELETE"]
    assert denied and denied[0]["verdict"] == "DROPPED" and denied[0]["Type"] == "L7"
    assert denied[0]["source"]["pod_name"] == "frontend" and denied[0]["destination"]["pod_name"] == "api"
    assert denied[0]["l7"]["http"]["url"].endswith("/api/v1/users")


async def test_bad_input_gets_the_protocols_answer_and_a_close(sandbox):
    too_big = b"GET /api/v1/users HTTP/1.1\r\nX-Big: " + b"a" * (61 * 1024) + b"\r\n\r\n"
    assert (await raw_exchange(sandbox, too_big)).startswith(b"HTTP/1.1 431 ")
    bad_chunk = b"POST /api/v1/users HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    assert (await raw_exchange(sandbox, bad_chunk)).startswith(b"HTTP/1.1 400 ")
    assert (await raw_exchange(sandbox, b"\x16\x03\x01\x00\xa5garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    # a head trickling in slower than the header timeout (10 s) is answered 408, however steady the trickle
    started = time.monotonic()
    answer = await slow_head(sandbox, b"GET /api/v1/users HTTP/1.1\r\nHost: api\r\nX-Slow: ", every=2.0)
    assert answer.startswith(b"HTTP/1.1 408 ") and 9 < time.monotonic() - started < 14
    # the proxy is still there for the next client
    assert (await http(sandbox, FRONTEND, "GET", "/api/v1/users")).http_status == 200


async def slow_head(state, start: bytes, *, every: float) -> bytes:
    """Send `start`, then one more header byte every `every` seconds until the proxy answers."""
    loop = asyncio.get_running_loop()
    sock = netns_mod.socket_in(cluster.source_netns(state, FRONTEND), socket.AF_INET, socket.SOCK_STREAM)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (await _api_ip(state), 8080)), 2)
        await loop.sock_sendall(sock, start)
        for _ in range(20):
            try:
                return await asyncio.wait_for(loop.sock_recv(sock, 65536), every)
            except TimeoutError:
                await loop.sock_sendall(sock, b"x")
        return b""
    finally:
        sock.close()


async def test_keep_alive_and_pipelined_requests_are_judged_one_by_one(sandbox):
    loop = asyncio.get_running_loop()
    sock = netns_mod.socket_in(cluster.source_netns(sandbox, FRONTEND), socket.AF_INET, socket.SOCK_STREAM)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (await _api_ip(sandbox), 8080)), 2)
        requests = [("GET", "/api/v1/users"), ("DELETE", "/api/v1/users"), ("GET", "/api/v1/health"),
                    ("POST", "/api/v1/products"), ("POST", "/api/v1/users")]
        body = b"{}"
        data = b"".join(f"{m} {p} HTTP/1.1\r\nHost: api\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
                        for m, p in requests)
        await loop.sock_sendall(sock, data[:40])  # pipelined, and cut mid-head
        await loop.sock_sendall(sock, data[40:])
        received = b""
        deadline = time.monotonic() + 5
        while received.count(b"HTTP/1.1 ") < len(requests) and time.monotonic() < deadline:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
            if not chunk:
                break
            received += chunk
        statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", received)]
        assert statuses == [200, 403, 200, 403, 200]
        assert received.count(b"Access denied\r\n") == 2
        assert b"production/api" in received  # the allowed ones were answered by the api pod itself
    finally:
        sock.close()


async def test_rule_changes_apply_to_the_next_request_of_an_established_connection(sandbox):
    loop = asyncio.get_running_loop()
    policy = yaml.safe_load((MANIFESTS / "30-api-l7-policy.yaml").read_text())
    policy["spec"]["ingress"][0]["toPorts"][0]["rules"]["http"].append({"method": "GET", "path": "/api/v1/products"})
    sock = netns_mod.socket_in(cluster.source_netns(sandbox, FRONTEND), socket.AF_INET, socket.SOCK_STREAM)

    async def status(path: str) -> int:
        await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: api\r\n\r\n".encode())
        received = b""
        while not re.search(rb"HTTP/1\.1 (\d{3}) .*?\r\n\r\n(production/api\n|Access denied\r\n)", received, re.S):
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
            assert chunk, f"connection closed after {received!r}"
            received += chunk
        return int(re.search(rb"HTTP/1\.1 (\d{3})", received).group(1))

    try:
        await asyncio.wait_for(loop.sock_connect(sock, (await _api_ip(sandbox), 8080)), 2)
        assert (await status("/api/v1/users"), await status("/api/v1/products")) == (200, 403)
        await cluster.apply_documents(sandbox, documents_from("products", [policy]))
        await cluster.wait(sandbox, timeout=60)
        assert (await status("/api/v1/users"), await status("/api/v1/products")) == (200, 200)
    finally:
        sock.close()
        await cluster.apply(sandbox, [str(MANIFESTS / "30-api-l7-policy.yaml")])
        await cluster.wait(sandbox, timeout=60)


EGRESS_POLICIES = [
    {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
     "metadata": {"name": "frontend-egress-l7", "namespace": "production"},
     "spec": {"endpointSelector": {"matchLabels": {"app": "frontend"}},
              "egress": [{"toEndpoints": [{"matchLabels": {"app": "api"}}],
                          "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}],
                                       "rules": {"http": [{"method": "GET", "path": "/api/v1/health"}]}}]}]}},
    {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
     "metadata": {"name": "db-egress-l7", "namespace": "production"},
     "spec": {"endpointSelector": {"matchLabels": {"app": "db"}},
              "egress": [{"toEndpoints": [{"matchLabels": {"app": "frontend"}}],
                          "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}],
                                       "rules": {"http": [{"method": "GET", "path": "/public/.*"}]}}]}]}},
]


async def test_egress_rules_are_enforced_by_the_clients_node(sandbox):
    """The client's egress proxy judges first, then the server's ingress rules still apply (its own redirect)."""
    docs = documents_from("egress-l7", EGRESS_POLICIES)
    await cluster.apply_documents(sandbox, docs)
    try:
        await cluster.wait(sandbox, timeout=60)
        got = [(m, p, (await http(sandbox, FRONTEND, m, p)).http_status)
               for m, p in (("GET", "/api/v1/health"), ("GET", "/api/v1/users"), ("DELETE", "/api/v1/users"))]
        assert got == [("GET", "/api/v1/health", 200), ("GET", "/api/v1/users", 403),
                       ("DELETE", "/api/v1/users", 403)]
        db = [(p, (await http(sandbox, "production/db", "GET", p, to=FRONTEND, port=80)).http_status)
              for p in ("/public/index.html", "/private")]
        assert db == [("/public/index.html", 200), ("/private", 403)]
    finally:
        await cluster.delete_documents(sandbox, docs)
        await cluster.wait(sandbox, timeout=60)


def _proxy_of_node(state, node: str) -> int:
    return next(s["pid"] for s in load_state(state.config["name"]).services
                if s["name"] == "l7-proxy" and s["node"] == node)


async def test_killed_proxy_fails_closed_and_returns_within_a_second(sandbox):
    async with cluster.Api(sandbox.apiserver_url) as api:
        pod = await api.request("GET", "/api/v1/namespaces/production/pods/api")
    node = pod["spec"]["nodeName"]
    node_netns = next(n["netns"] for n in sandbox.nodes if n["name"] == node)
    listener = PROXY_PORTS[("http", "ingress")]
    pid = _proxy_of_node(sandbox, node)
    os.kill(pid, signal.SIGKILL)
    outage: list[probe.ProbeResult] = []
    listening_at = None
    served_at = None
    deadline = time.monotonic() + 60
    while served_at is None and time.monotonic() < deadline:
        res = await http(sandbox, FRONTEND, "DELETE", "/api/v1/users", timeout=0.3)
        if listening_at is None:
            outage.append(res)
            if _listening(node_netns, listener):
                listening_at = time.monotonic()
        elif res.http_status == 403:
            served_at = time.monotonic()
    assert outage and all(r.http_status in (None, 403) for r in outage), \
        [r.http_status for r in outage]  # a DELETE never reached the api while the proxy was away
    assert any(not r.connected for r in outage)  # dropped, not forwarded
    assert served_at is not None and listening_at is not None
    assert served_at - listening_at < 1.0


def _listening(node_netns: str, port: int) -> bool:
    sock = netns_mod.socket_in(node_netns, socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(True)
    sock.settimeout(0.2)
    try:
        sock.connect(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        sock.close()
