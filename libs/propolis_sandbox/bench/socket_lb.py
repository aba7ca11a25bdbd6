"""`propolis bench node`, part `socket_lb`: connect latency to a ClusterIP, same run, same Service:

* from the node itself (its cgroup and network namespace): socket LB picks the backend at connect();
* from a pod on that node: the per-packet path (cil_from_container DNAT, conntrack, reverse NAT);
* from the node straight to a backend's address: the same route with no LB at all (the floor).

Both backends are pods on the other node, so every connect crosses the underlay the same way. Each
client is a process of its own (`python -m propolis_sandbox.bench.socket_lb CONNECT IP PORT N`), in the
node's cgroup like the node's and the pods' processes of the sandbox; it times connect() only
(perf_counter_ns around the handshake, the socket closed with RST so no TIME_WAIT piles up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import struct
import sys
import time
from collections import Counter
from typing import Any

from propolis_sandbox import cgroups, cluster
from propolis_sandbox.config import SandboxState
from propolis_sandbox.netns import netns_exec_argv
from propolis_sandbox.resources import KINDS, documents_from

NAMESPACE = "bench-socket-lb"
PORT, TARGET_PORT = 80, 8080
WARMUP = 20


def _manifests(state: SandboxState) -> list[dict[str, Any]]:
    n1, n2 = state.sandbox().node_names()[:2]

    def pod(name: str, node: str, labels: dict[str, str]) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "echo", "ports": [
                    {"name": "http", "containerPort": TARGET_PORT, "protocol": "TCP"}]}]}}

    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
            pod("client", n1, {"role": "client"}), pod("web-1", n2, {"app": "web"}), pod("web-2", n2, {"app": "web"}),
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NAMESPACE},
             "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": PORT, "targetPort": "http"}]}}]


def _summary(samples_ns: list[int]) -> dict[str, Any]:
    us = sorted(s / 1000 for s in samples_ns)
    return {"connects": len(us), "p50_us": round(statistics.median(us), 1),
            "p90_us": round(us[int(len(us) * 0.9)], 1), "p99_us": round(us[int(len(us) * 0.99)], 1)}


async def _client(argv: list[str]) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bench client {argv[-4:]} exited {proc.returncode}: {err.decode(errors='replace')}")
    result: dict[str, Any] = json.loads(out)
    return result


async def connect_latency(state: SandboxState, connects: int) -> list[dict[str, Any]]:
    """One row per path: p50/p90/p99 of connect() in µs, and which backends answered (by address)."""
    cfg = state.sandbox()
    node = cfg.node_names()[0]
    docs = documents_from("bench socket-lb", _manifests(state))
    await cluster.apply_documents(state, docs)
    try:
        ips = await cluster.wait_running(state, 3, namespace=NAMESPACE, timeout=90)
        await cluster.wait(state, timeout=60)
        async with cluster.Api(state.apiserver_url) as api:
            cluster_ip = (await api.get(KINDS["Service"], NAMESPACE, "web"))["spec"]["clusterIP"]
        node_cgroup = cgroups.node_cgroup(cfg.name, node)
        client = [sys.executable, "-m", "propolis_sandbox.bench.socket_lb"]
        paths = (
            ("socket LB: node -> ClusterIP", cfg.node_netns(1), cluster_ip, PORT),
            ("per-packet LB: pod -> ClusterIP", cfg.pod_netns(NAMESPACE, "client"), cluster_ip, PORT),
            ("no LB: node -> backend pod IP", cfg.node_netns(1), ips[f"{NAMESPACE}/web-1"], TARGET_PORT),
        )
        rows = []
        for _round in range(2):  # interleaved rounds: the machine's load drifts
            for path, netns, ip, port in paths:
                argv = cgroups.in_cgroup_argv(node_cgroup, netns_exec_argv(netns, [*client, "connect", ip, str(port),
                                                                                   str(connects)]))
                rows.append({"path": path, "to": f"{ip}:{port}", **await _client(argv)})
        merged = []
        for path, _netns, ip, port in paths:
            mine = [r for r in rows if r["path"] == path]
            samples = [s for r in mine for s in r.pop("samples_ns")]
            peers = Counter[str]()
            for r in mine:
                peers.update(r["peers"])
            merged.append({"path": path, "to": f"{ip}:{port}", **_summary(samples), "peers": dict(peers)})
        return merged
    finally:
        await cluster.delete_documents(state, docs)


def _measure(ip: str, port: int, count: int) -> dict[str, Any]:
    """The client process: `count` connects after WARMUP, each timed; the peer each socket reports."""
    samples: list[int] = []
    peers: Counter[str] = Counter()
    linger = struct.pack("ii", 1, 0)  # close = RST: no TIME_WAIT between rounds
    for i in range(WARMUP + count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(2.0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        try:
            started = time.perf_counter_ns()
            sock.connect((ip, port))
            elapsed = time.perf_counter_ns() - started
            if i >= WARMUP:
                samples.append(elapsed)
                sock.sendall(b"bench\n")  # the echo answers with its ns/pod
                peers[sock.recv(64).split(b" ", 1)[0].decode(errors="replace").strip()] += 1
        finally:
            sock.close()
    return {"samples_ns": samples, "peers": dict(peers)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="connect-latency client of `propolis bench node`")
    parser.add_argument("mode", choices=("connect",))
    parser.add_argument("ip")
    parser.add_argument("port", type=int)
    parser.add_argument("count", type=int)
    args = parser.parse_args(argv)
    print(json.dumps(_measure(args.ip, args.port, args.count)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
