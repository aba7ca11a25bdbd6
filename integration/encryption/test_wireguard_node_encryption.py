"""encryption.nodeEncryption (`sandbox up --encryption wireguard --node-encryption`), with real packets.

Each peer's allowed IPs hold its node's InternalIP besides its pod CIDR; traffic the node itself sends to
another node, or to a pod on another node, crosses the underlay only as UDP 51871 (a known payload is never
seen in cleartext), while WireGuard's own UDP, marked with fwmark 0x1E00, still leaves by the underlay.
`status` says `NodeEncryption: Enabled`.
"""

from __future__ import annotations

import asyncio
import socket
import uuid

import pytest
from test_wireguard_sandbox import NS, pod, propolis, write
from wg_helpers import WG_PORT, Capture, admin_bus, keymgr_progress, pod_ip

from propolis.runtime.heartbeats import newest, read_heartbeats
from propolis_sandbox import cluster
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.netns import socket_in

pytestmark = pytest.mark.root

SERVICES = "k8s-watcher,identity-allocator,datapath-writer,wireguard-keymgr"
NODE_PORT = 7717  # a server in node 2's namespace (a hostNetwork process)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    with running_sandbox(nodes=2, services=SERVICES, encryption="wireguard",
                         encryption_node_encryption=True) as state:
        n1, n2 = state.sandbox().node_names()
        docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}, pod("b", n2, "b")]
        asyncio.run(cluster.apply(state, [write(tmp_path_factory.mktemp("wgn"), docs)]))
        asyncio.run(cluster.wait_running(state, 1, namespace=NS))
        asyncio.run(cluster.wait(state, timeout=60))
        yield state


async def echo_from_node(state, n: int, address: tuple[str, int], line: bytes, *, attempts: int = 30) -> bytes:
    """One line over TCP from node n's namespace; the first tries may start the handshake."""
    loop = asyncio.get_running_loop()
    for attempt in range(attempts):
        sock = socket_in(state.sandbox().node_netns(n), socket.AF_INET, socket.SOCK_STREAM)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, address), 1.0)
            await loop.sock_sendall(sock, line + b"\n")
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 2.0)
                if not chunk:
                    break
                answer += chunk
            return answer.strip()
        except (TimeoutError, OSError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.2)
        finally:
            sock.close()
    raise AssertionError("unreachable")


class NodeEchoServer:
    """A TCP echo server in node n's namespace (what a hostNetwork pod would run)."""

    def __init__(self, state, n: int) -> None:
        self.netns = state.sandbox().node_netns(n)

    async def __aenter__(self) -> NodeEchoServer:
        listener = socket_in(self.netns, socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", NODE_PORT))
        self.server = await asyncio.start_server(self._serve, sock=listener)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()


async def test_node_ips_are_allowed_ips_and_status_says_enabled(sandbox):
    cfg = sandbox.sandbox()
    bus = admin_bus(sandbox, "wg-test-node-encryption")
    await bus.connect(max_wait=5)
    try:
        for n, node in enumerate(cfg.node_names(), start=1):
            other = 2 if n == 1 else 1
            progress = await keymgr_progress(bus, node)
            assert progress["node_encryption"] is True
            [peer] = progress["peer_list"]
            assert set(peer["allowed_ips"]) == {cfg.pod_cidr(other), f"{cfg.node_ip(other)}/32"}
            assert set(progress["node_routes"]) == {cfg.pod_cidr(other), f"{cfg.node_ip(other)}/32"}
            feature = newest(await read_heartbeats(bus), "wireguard-keymgr", node).features["Encryption"]
            assert feature["detail"].startswith("[NodeEncryption: Enabled, cilium_wg0")
    finally:
        await bus.close()
    text = (await asyncio.to_thread(propolis, "encrypt", "status", "--name", cfg.name)).stdout
    assert text.count("Node encryption: Enabled") == 2 and text.count("Strict mode: Disabled") == 2


async def test_node_to_node_and_node_to_pod_cross_the_underlay_encrypted(sandbox):
    cfg = sandbox.sandbox()
    b = await pod_ip(sandbox, f"{NS}/b")
    secret = f"propolis-node-{uuid.uuid4().hex}".encode()
    async with NodeEchoServer(sandbox, 2):
        await echo_from_node(sandbox, 1, (cfg.node_ip(2), NODE_PORT), b"handshake")
        await echo_from_node(sandbox, 1, (b, 8080), b"handshake")
        with Capture(cfg.underlay_netns) as cap:
            for _ in range(5):
                assert await echo_from_node(sandbox, 1, (cfg.node_ip(2), NODE_PORT), secret) == secret
                assert await echo_from_node(sandbox, 1, (b, 8080), secret) == f"{NS}/b ".encode() + secret
            await asyncio.sleep(0.2)
    assert not cap.contains(secret), "node traffic seen in cleartext on the underlay"
    assert cap.count(6, NODE_PORT) == 0 and cap.count(6, 8080) == 0, "node TCP seen unencapsulated"
    assert cap.count(17, WG_PORT) >= 20, f"expected WireGuard UDP {WG_PORT}, saw {cap.count(17, WG_PORT)}"
