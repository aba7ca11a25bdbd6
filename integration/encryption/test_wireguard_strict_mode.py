"""encryption.strictMode (`sandbox up --encryption wireguard --encryption-strict`), with real packets.

Pods a and c on node 1, b on node 2. Cross-node pod traffic through `cilium_wg0` crosses the underlay only as
UDP 51871 and is not touched by strict mode. The same conversation forced around the tunnel (a more specific
native route to b's address on node 1, which the key manager does not own) is dropped in BPF on node 1's
underlay device with drop reason UNENCRYPTED_TRAFFIC: counted in the node's drop metric, seen as a Hubble drop
flow from a to b, and not one cleartext packet of it appears on the underlay. Turning strict mode off in the
node's runtime config for a moment shows the capture does see that cleartext when nothing drops it. Same-node
traffic is unaffected throughout. What the node sends with a pod's address (the L7 proxy's upstream) takes the
tunnel like the pod's own packets.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import socket
import time
import uuid

import pytest
from test_wireguard_hubble import observe
from test_wireguard_sandbox import NS, pod, propolis, write
from wg_helpers import WG_PORT, Capture, can_connect, connect_with_retry, pod_ip

from propolis.maps import config, metrics
from propolis.maps.drop import DROP_UNENCRYPTED_TRAFFIC
from propolis_sandbox import cluster
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.netns import iproute_in, socket_in

pytestmark = pytest.mark.root

SERVICES = "k8s-watcher,identity-allocator,datapath-writer,wireguard-keymgr,hubble,hubble-relay"
ECHO_PORT = 8080
IP_TRANSPARENT = 19  # linux/in.h


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    with running_sandbox(nodes=2, services=SERVICES, encryption="wireguard", encryption_strict_mode=True) as state:
        n1, n2 = state.sandbox().node_names()
        docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
                pod("a", n1, "a"), pod("c", n1, "c"), pod("b", n2, "b")]
        asyncio.run(cluster.apply(state, [write(tmp_path_factory.mktemp("wgs"), docs)]))
        asyncio.run(cluster.wait_running(state, 3, namespace=NS))
        asyncio.run(cluster.wait(state, timeout=60))
        yield state


@pytest.fixture(scope="module")
def ips(sandbox):
    async def get():
        return {p: await pod_ip(sandbox, f"{NS}/{p}") for p in ("a", "b", "c")}
    return asyncio.run(get())


def unencrypted_drops(state, n: int) -> int:
    """Packets node n dropped as UNENCRYPTED_TRAFFIC (cilium_metrics, all directions)."""
    cfg = state.sandbox()
    with metrics.SPEC.open(str(cfg.pin_dir(cfg.node_names()[n - 1]))) as bpf_map:
        return sum(r.packets for r in metrics.dump(bpf_map) if r.reason == DROP_UNENCRYPTED_TRAFFIC)


class ClearRoute:
    """``<ip>/32 via <node's InternalIP>`` on node n: a route around cilium_wg0 (more specific than the key
    manager's pod-CIDR route, and not one it owns, so it stays); removed on exit whatever happened."""

    def __init__(self, state, n: int, ip: str, via_node: int) -> None:
        cfg = state.sandbox()
        self.netns, self.dst, self.gateway = cfg.node_netns(n), f"{ip}/32", cfg.node_ip(via_node)

    def _route(self, op: str) -> None:
        with iproute_in(self.netns) as ipr:  # pyroute2's sync API: off the event loop
            ipr.route(op, dst=self.dst, gateway=self.gateway)

    async def __aenter__(self) -> ClearRoute:
        await asyncio.to_thread(self._route, "replace")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self._route, "del")


class StrictModeOff:
    """Strict mode off in node n's runtime config (what the writer wrote goes back on exit)."""

    def __init__(self, state, n: int) -> None:
        cfg = state.sandbox()
        self.pin_dir = str(cfg.pin_dir(cfg.node_names()[n - 1]))

    def __enter__(self) -> StrictModeOff:
        with config.SPEC.open(self.pin_dir) as bpf_map:
            self.saved = bpf_map.lookup(ctypes.c_uint32(0))
            assert self.saved is not None and config.decode(self.saved)["strict_mode_cidr"], "strict mode not on"
            off = config.RuntimeConfig.from_buffer_copy(bytes(self.saved))
            off.strict_ipv4_net = off.strict_ipv4_mask = 0
            bpf_map.update(ctypes.c_uint32(0), off)
        return self

    def __exit__(self, *exc: object) -> None:
        with config.SPEC.open(self.pin_dir) as bpf_map:
            bpf_map.update(ctypes.c_uint32(0), self.saved)


def send_udp(state, source: str, ip: str, payload: bytes, count: int = 10) -> None:
    ns, name = source.split("/")
    sock = socket_in(state.sandbox().pod_netns(ns, name), socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for i in range(count):
            try:
                sock.sendto(payload + b" %d" % i, (ip, ECHO_PORT))
            except BlockingIOError:
                pass
            time.sleep(0.01)
    finally:
        sock.close()


async def test_tunnelled_traffic_passes_strict_mode_encrypted(sandbox, ips):
    cfg = sandbox.sandbox()
    secret = f"propolis-strict-{uuid.uuid4().hex}".encode()
    stream = await connect_with_retry(sandbox, f"{NS}/a", ips["b"])
    same = await connect_with_retry(sandbox, f"{NS}/a", ips["c"])
    before = unencrypted_drops(sandbox, 1)
    try:
        with Capture(cfg.underlay_netns) as cap:
            for i in range(20):
                assert await stream.echo(secret + b" %d" % i) == f"{NS}/b ".encode() + secret + b" %d" % i
                assert await same.echo(secret) == f"{NS}/c ".encode() + secret
            await asyncio.sleep(0.2)
    finally:
        stream.close()
        same.close()
    assert not cap.contains(secret), "payload seen in cleartext on the underlay"
    assert cap.count(17, WG_PORT) >= 40, f"expected WireGuard UDP {WG_PORT}, saw {cap.count(17, WG_PORT)}"
    assert cap.count(6, ECHO_PORT) == 0, "pod TCP seen unencapsulated on the underlay"
    assert unencrypted_drops(sandbox, 1) == before, "strict mode dropped tunnelled traffic"


async def test_traffic_forced_around_the_tunnel_is_dropped_never_leaked(sandbox, ips):
    cfg = sandbox.sandbox()
    secret = f"propolis-clear-{uuid.uuid4().hex}".encode()
    before = unencrypted_drops(sandbox, 1)
    async with ClearRoute(sandbox, 1, ips["b"], via_node=2):
        with Capture(cfg.underlay_netns) as cap:
            assert not await can_connect(sandbox, f"{NS}/a", ips["b"]), "a reached b around the tunnel"
            await asyncio.to_thread(send_udp, sandbox, f"{NS}/a", ips["b"], secret)
            assert await can_connect(sandbox, f"{NS}/a", ips["c"]), "same-node traffic broken by strict mode"
            await asyncio.sleep(0.2)
        assert not cap.contains(secret), "UDP payload leaked in cleartext on the underlay"
        assert cap.count(6, ECHO_PORT) == 0 and cap.count(17, ECHO_PORT) == 0, "pod traffic seen in clear"
        dropped = unencrypted_drops(sandbox, 1) - before
        assert dropped >= 10, f"expected the SYNs and 10 datagrams dropped as UNENCRYPTED_TRAFFIC, counted {dropped}"

        # the capture would have seen the leak: without strict mode the same datagrams cross in clear
        with StrictModeOff(sandbox, 1), Capture(cfg.underlay_netns) as leak:
            await asyncio.to_thread(send_udp, sandbox, f"{NS}/a", ips["b"], secret)
            await asyncio.sleep(0.2)
        assert leak.contains(secret), "control: with strict mode off the clear route should leak the payload"

    deadline = time.monotonic() + 20
    while True:  # the drops reach node 1's Hubble observer within a moment
        flows = await asyncio.to_thread(observe, sandbox, "--from-pod", f"{NS}/a", "--to-pod", f"{NS}/b",
                                        "--verdict", "DROPPED")
        drops = [f for f in flows if f.get("drop_reason_desc") == "UNENCRYPTED_TRAFFIC"]
        if drops or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert drops, f"no UNENCRYPTED_TRAFFIC drop flow a -> b in Hubble: {flows[-3:]}"
    assert {f["node_name"] for f in drops} == {cfg.node_names()[0]}
    assert drops[0]["source"]["pod_name"] == "a" and drops[0]["destination"]["pod_name"] == "b"
    assert not any(f["IP"].get("encrypted") for f in drops), "a packet dropped as unencrypted shown as encrypted"

    # the route gone, the tunnel carries a -> b again
    (await connect_with_retry(sandbox, f"{NS}/a", ips["b"])).close()


def send_udp_as_pod_from_node(state, n: int, pod_address: str, ip: str, payload: bytes, count: int = 10) -> None:
    """What a transparent proxy on node n does: send from a local pod's address (IP_TRANSPARENT)."""
    sock = socket_in(state.sandbox().node_netns(n), socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((pod_address, 0))
        for i in range(count):
            try:
                sock.sendto(payload + b" %d" % i, (ip, ECHO_PORT))
            except BlockingIOError:
                pass
            time.sleep(0.01)
    finally:
        sock.close()


async def test_node_traffic_with_a_pod_address_goes_through_the_tunnel(sandbox, ips):
    """The L7 proxy's upstream leaves the node with the client pod's address: pod traffic, so it must take the
    tunnel (not the node's own native routes, where strict mode would drop it and without it it would leak)."""
    cfg = sandbox.sandbox()
    secret = f"propolis-proxied-{uuid.uuid4().hex}".encode()
    await connect_with_retry(sandbox, f"{NS}/a", ips["b"])  # handshake done
    before = unencrypted_drops(sandbox, 1)
    with Capture(cfg.underlay_netns) as cap:
        await asyncio.to_thread(send_udp_as_pod_from_node, sandbox, 1, ips["a"], ips["b"], secret)
        await asyncio.sleep(0.2)
    assert unencrypted_drops(sandbox, 1) == before, "pod-addressed node traffic took the clear path"
    assert not cap.contains(secret), "pod-addressed node traffic seen in cleartext"
    assert cap.count(17, WG_PORT) >= 10, f"expected it as WireGuard UDP {WG_PORT}, saw {cap.count(17, WG_PORT)}"


def test_encrypt_status_shows_strict_mode_per_node(sandbox):
    cfg = sandbox.sandbox()
    proc = propolis("encrypt", "status", "--name", cfg.name, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    nodes = json.loads(proc.stdout)["nodes"]
    assert set(nodes) == set(cfg.node_names())
    for st in nodes.values():
        assert st["strict_mode"] == {"cidr": cfg.cluster_cidr, "devices": ["eth0"],
                                     "allow_remote_node_identities": False}
        assert st["node_encryption"] is False
    text = propolis("encrypt", "status", "--name", cfg.name).stdout
    assert text.count(f"Strict mode: Enabled (CIDR {cfg.cluster_cidr}, allowRemoteNodeIdentities: false)") == 2
    assert text.count("Node encryption: Disabled") == 2
