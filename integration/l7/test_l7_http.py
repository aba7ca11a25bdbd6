"""The seed's `api-l7-policy` (demo manifest, applied verbatim) enforced request by request by the l7-proxy,
with real packets between sandbox pods on two nodes: the datapath redirects frontend -> api:8080 to the
api node's proxy, which answers denied requests 403 and forwards allowed ones with the client's address.

Killing the proxy fails closed (redirected connections are dropped, never forwarded unfiltered) and a
restarted proxy serves new connections within a second of listening again.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from propolis import demo
from propolis.l7.redirect import PROXY_PORTS
from propolis.sandbox import cluster, probe
from propolis.sandbox import netns as netns_mod
from propolis.sandbox.config import load_state
from propolis.sandbox.fixture import running_sandbox

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


async def http(state, source: str, method: str, path: str, timeout: float = 2.0) -> probe.ProbeResult:
    spec = probe.ProbeSpec(cluster.source_netns(state, source), await _api_ip(state), 8080,
                           http=(method, path))
    return await probe.probe(spec, timeout=timeout)


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
