"""The `hub` fixture (registered by conftest.py): a node namespace with pods (integration/datapath's topology),
bpf_lxc attached, a real nats-server with identities/services written as the suite would, and the real
`propolis-hubble` and `propolis-hubble-relay` processes. Everything is torn down even when tests fail."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "datapath"))
from datapath_topology import EchoServers, Node, add_pod, sh, teardown

from propolis.bus import subjects
from propolis.bus.connection import Bus
from propolis.bus.embedded import EmbeddedNats
from propolis.bus.messages import EndpointRecord, IdentityRecord, K8sObject
from propolis.datapath import Datapath, IPCacheEntry

NS = "hubtest"
POD_NAMES = {"a": "client-7d4b9c6f5d-abcde", "b": "server-0", "c": "intruder-x7k2p"}
SERVICE_IP = "10.96.77.7"
RING = 2047
EXPORT_MB = 0.05


@dataclass
class Hub:
    node: Node
    name: str
    nats_url: str
    work: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    relay_url: str = ""
    hubble_http: str = ""

    @property
    def export_file(self) -> Path:
        return self.work / "export" / "flows.json"

    def env(self) -> dict[str, str]:
        return {**os.environ, "PROPOLIS_NATS_URL": self.nats_url}


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


async def _seed(url: str, node: Node) -> None:
    """What the identity-allocator and k8s-watcher would have written."""
    bus = Bus(url, name="hubble-test-seed")
    await bus.connect(max_wait=5)
    try:
        await bus.ensure_buckets()
        ids = await bus.kv(subjects.IDENTITIES_BUCKET)
        k8s = await bus.kv(subjects.K8S_BUCKET)
        for key, pod in node.pods.items():
            app = POD_NAMES[key].split("-")[0]
            labels = [f"k8s:app={app}", f"k8s:io.kubernetes.pod.namespace={NS}"]
            await ids.put(f"id.{pod.identity}", IdentityRecord(pod.identity, labels))
            await ids.put(f"endpoints.{NS}.{POD_NAMES[key]}",
                          EndpointRecord(NS, POD_NAMES[key], node.netns, [pod.ip], pod.identity, labels))
        await k8s.put(f"services.{NS}.server", K8sObject(
            "Service", NS, "server", "u1", "1", fields={"clusterIP": SERVICE_IP, "ports": [{"port": 80,
                                                                                        "targetPort": 8080}]}))
        await k8s.put(f"endpointslices.{NS}.server-x1", K8sObject(
            "EndpointSlice", NS, "server-x1", "u2", "1", labels={"kubernetes.io/service-name": "server"},
            fields={"endpoints": [{"addresses": [node.pods["b"].ip]}], "ports": [{"port": 8080}]}))
    finally:
        await bus.close()


async def _urls(url: str, timeout: float = 30.0) -> tuple[str, str]:
    """(relay URL, hubble /metrics base) from the heartbeats, once hubble reads the ring and has synced its
    enricher (its watches start with jitter, so the ring can be read before the Services are known)."""
    bus = Bus(url, name="hubble-test-wait")
    await bus.connect(max_wait=5)
    try:
        kv = await bus.kv(subjects.HEARTBEATS_BUCKET)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            relay = hubble = ""
            for key, entry in (await kv.items()).items():
                hb = entry.value
                if key.startswith("hubble-relay."):
                    relay = hb.progress.get("relay_url", "")
                elif key.startswith("hubble.") and all(hb.components.get(c, {}).get("state") == "ok"
                                                       for c in ("observer", "enricher")):
                    # the enricher synced too: a flow recorded before it knows the Service has no service name
                    hubble = hb.http
            if relay and hubble:
                return relay, hubble
            await asyncio.sleep(0.2)
    finally:
        await bus.close()
    raise TimeoutError("hubble and hubble-relay did not come up")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with_signal = signal.SIGCONT  # a test may have paused it
        proc.send_signal(with_signal)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def hub() -> Iterator[Hub]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    suffix = secrets.token_hex(3)
    octet = int(suffix[:2], 16) % 200 + 20
    node = Node(suffix, f"pphub-node-{suffix}", f"10.249.{octet}")
    work = Path(tempfile.mkdtemp(prefix="pphub-"))
    nats = EmbeddedNats(work / "nats")
    h = Hub(node, f"pphub-{suffix}", "", work)
    try:
        nats.start_sync()
        h.nats_url = nats.url
        sh("ip", "netns", "add", node.netns)
        sh("ip", "netns", "exec", node.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh("ip", "-n", node.netns, "link", "set", "lo", "up")
        add_pod(node, "a", 10, endpoint_id=201, identity=41001)
        add_pod(node, "b", 20, endpoint_id=202, identity=41002)
        add_pod(node, "c", 30, endpoint_id=203, identity=41003)
        node.servers.append(EchoServers(node.pods["b"], tcp_ports=(8080, 8081, 9000), udp_ports=(5353,)))
        node.dp = Datapath(h.name, netns=node.netns)
        node.dp.load_sync()
        node.dp.set_ipcache([IPCacheEntry(p.ip, p.identity) for p in node.pods.values()])

        async def attach() -> None:
            assert node.dp is not None
            for pod in node.pods.values():
                await node.dp.attach_endpoint(endpoint_id=pod.endpoint_id, ip=pod.ip, identity=pod.identity,
                                              ifname=pod.lxc, ingress_enforced=False, egress_enforced=False)
            await node.dp._tc.close()
            await _seed(h.nats_url, node)

        asyncio.run(attach())
        env = {**h.env(), "PROPOLIS_NODE_NAME": h.name, "PROPOLIS_HTTP_PORT": "0",
               "PROPOLIS_HEARTBEAT_INTERVAL": "0.5", "PROPOLIS_SANDBOX": ""}
        logs = work / "logs"
        logs.mkdir()
        h.procs["hubble"] = subprocess.Popen(
            [_bin("propolis-hubble"), "--bpf-pin-dir", node.dp.pin_dir,
             "--hubble-event-buffer-capacity", str(RING),
             "--hubble-metrics", "{flow,drop:sourceContext=pod;destinationContext=pod,tcp,port-distribution,"
                                 "policy,icmp,dns,http}",
             "--hubble-export-file-path", str(h.export_file), "--hubble-export-file-max-size-mb", str(EXPORT_MB),
             "--hubble-export-file-max-backups", "2", "--lost-poll-interval", "0.2"],
            env=env, stdout=open(logs / "hubble.log", "wb"), stderr=subprocess.STDOUT)
        h.procs["relay"] = subprocess.Popen(
            [_bin("propolis-hubble-relay"), "--hubble-relay-listen-address", "127.0.0.1:0",
             "--node-name", "pphub-control-plane"],
            env=env, stdout=open(logs / "relay.log", "wb"), stderr=subprocess.STDOUT)
        h.relay_url, h.hubble_http = asyncio.run(_urls(h.nats_url))
        yield h
    finally:
        for proc in h.procs.values():
            _stop(proc)
        try:
            teardown(node)
        finally:
            nats.stop_sync()
            if os.environ.get("PROPOLIS_KEEP_TEST_LOGS"):
                print(f"hubble test logs kept in {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
