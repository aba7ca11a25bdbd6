"""`propolis bench encryption`: pod-to-pod across nodes with and without WireGuard, in one run.

Two sandboxes in turn (plain: native routes; encrypted: `--encryption wireguard`), each with a
source pod on node 1 and a destination pod on node 2. Figures: TCP throughput with 1 and 4
streams (sender and sink threads of this process inside the pods' namespaces, so the numbers
include Python's cost on both ends — identical for both runs), request/response latency to the
destination's echo server, the CPU the two wireguard-go processes used while streaming, and the
datagrams their nodes' UDP receive buffers dropped meanwhile (each a TCP retransmission in the tunnel).
Seed anchors: kernel WireGuard costs 3–5 % in Cilium; wireguard-go reaches 7–13 Gbit/s on large
machines. Goal here: ≥ 1 Gbit/s userspace on a 2-core machine using less than one core.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from propolis_sandbox import cluster
from propolis_sandbox.bench.common import percentile
from propolis_sandbox.config import SandboxState
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.netns import socket_in
from propolis_sandbox.resources import documents_from

NAMESPACE = "bench-encryption"
SINK_PORT = 5001
ECHO_PORT = 8080
CHUNK = 1 << 20


def _manifest(n1: str, n2: str) -> list[dict[str, Any]]:
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NAMESPACE},
             "spec": {"nodeName": node, "containers": [{"name": "echo", "image": "echo",
                                                        "ports": [{"containerPort": ECHO_PORT}]}]}}
            for name, node in (("src", n1), ("dst", n2))]
    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}, *pods]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _udp_rcvbuf_errors(pid: int) -> int:
    """UdpRcvbufErrors of the network namespace process `pid` runs in."""
    head, values = (line.split() for line in Path(f"/proc/{pid}/net/snmp").read_text().splitlines()
                    if line.startswith("Udp:"))
    return int(values[head.index("RcvbufErrors")])


def _throughput(state: SandboxState, dst_ip: str, streams: int, seconds: float, pids: list[int]) -> dict[str, Any]:
    cfg = state.sandbox()
    server = socket_in(cfg.pod_netns(NAMESPACE, "dst"), socket.AF_INET, socket.SOCK_STREAM)
    server.setblocking(True)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((dst_ip, SINK_PORT))
    server.listen(streams)
    received = [0] * streams

    def sink(i: int) -> None:
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(CHUNK):
                received[i] += len(chunk)

    def send(stop_at: float) -> None:
        deadline = time.monotonic() + 10
        while True:  # the first packets to a peer start the WireGuard handshake
            sock = socket_in(cfg.pod_netns(NAMESPACE, "src"), socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(True)
            sock.settimeout(1.0)
            try:
                sock.connect((dst_ip, SINK_PORT))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
        sock.settimeout(None)
        buf = b"\0" * CHUNK
        with sock:
            while time.monotonic() < stop_at:
                sock.sendall(buf)

    sinks = [threading.Thread(target=sink, args=(i,), daemon=True) for i in range(streams)]
    for t in sinks:
        t.start()
    cpu0 = [_cpu_seconds(p) for p in pids]
    drops0 = [_udp_rcvbuf_errors(p) for p in pids]
    start = time.monotonic()
    senders = [threading.Thread(target=send, args=(start + seconds,), daemon=True) for _ in range(streams)]
    for t in senders:
        t.start()
    for t in senders + sinks:
        t.join(seconds + 30)
    elapsed = time.monotonic() - start
    server.close()
    out: dict[str, Any] = {"streams": streams, "gbit_s": round(sum(received) * 8 / elapsed / 1e9, 3)}
    if pids:
        out["wireguard_go_cores"] = [round((_cpu_seconds(p) - c) / elapsed, 2) for p, c in zip(pids, cpu0)]
        out["udp_rcvbuf_drops"] = [_udp_rcvbuf_errors(p) - d for p, d in zip(pids, drops0)]
    return out


async def _latency(state: SandboxState, dst_ip: str, samples: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    sock = socket_in(state.sandbox().pod_netns(NAMESPACE, "src"), socket.AF_INET, socket.SOCK_STREAM)
    await asyncio.wait_for(loop.sock_connect(sock, (dst_ip, ECHO_PORT)), 10)
    rtts = []
    with sock:
        for i in range(samples):
            t0 = time.perf_counter()
            await loop.sock_sendall(sock, b"ping %d\n" % i)
            data = b""
            while not data.endswith(b"\n"):
                data += await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
            rtts.append((time.perf_counter() - t0) * 1e6)
    return {"samples": samples, "p50_us": round(percentile(rtts, 50)), "p99_us": round(percentile(rtts, 99))}


def _one(encryption: str, seconds: float, samples: int) -> dict[str, Any]:
    services = "k8s-watcher,wireguard-keymgr" if encryption else "k8s-watcher"
    with running_sandbox(nodes=2, services=services, encryption=encryption) as state:
        cfg = state.sandbox()
        n1, n2 = cfg.node_names()

        async def deploy() -> str:
            await cluster.apply_documents(state, documents_from("bench encryption", _manifest(n1, n2)))
            await cluster.wait_running(state, 2, namespace=NAMESPACE)
            return str((await cluster.get(state, "pods", f"{NAMESPACE}/dst"))["status"]["podIP"])
        dst_ip = asyncio.run(deploy())
        pids = [int((cfg.run_dir / n / "wireguard" / "wireguard-go.pid").read_text()) for n in (n1, n2)] \
            if encryption else []
        figures: dict[str, Any] = {"encryption": encryption or "none"}
        figures["throughput"] = [_throughput(state, dst_ip, streams, seconds, pids) for streams in (1, 4)]
        figures["request_response"] = asyncio.run(_latency(state, dst_ip, samples))
        return figures


def run(seconds: float = 5.0, samples: int = 2000) -> dict[str, Any]:
    plain = _one("", seconds, samples)
    wg = _one("wireguard", seconds, samples)
    ratio = [round(w["gbit_s"] / p["gbit_s"], 3) if p["gbit_s"] else None
             for p, w in zip(plain["throughput"], wg["throughput"])]
    return {"plain": plain, "wireguard": wg, "throughput_ratio_wireguard_to_plain": ratio,
            "goal": "wireguard-go >= 1 Gbit/s using < 1 core (2-core machine)",
            "anchors": "kernel WireGuard 3-5 % cost (Cilium); wireguard-go 7-13 Gbit/s on large machines"}
