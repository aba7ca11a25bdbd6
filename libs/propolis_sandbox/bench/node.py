"""`propolis bench node`: what the node itself does, measured in one sandbox run.

Part `shaping` (Bandwidth Manager): the accuracy table: for each target rate, pods annotated with it,
TCP goodput measured across nodes (`bandwidth/measure.py`: bounded transfer, counted at the receiver
after a warm-up) for egress-bandwidth (sender's eth0) and ingress-bandwidth (receiver's lxc), 1 and 4
streams; error = measured / target - 1. Goodput excludes headers (Ethernet + IP + TCP with timestamps:
66 of every 1514 bytes at MTU 1500), so a perfect shaper reads about -4.4 %.

Part `host_firewall`: the host program's per-packet cost with and without a host policy
(`bench/host_firewall.py`).

Part `socket_lb`: connect latency to a ClusterIP from the node (socket LB) and from a pod (per-packet
LB), same run and Service, with the node straight to a backend as the floor (`bench/socket_lb.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from propolis.bandwidth.annotations import EGRESS_BANDWIDTH, INGRESS_BANDWIDTH, parse_quantity
from propolis.bandwidth.shaper import select_mode
from propolis.kernel_probe import probe_all
from propolis_sandbox import cluster
from propolis_sandbox.bandwidth_measure import measure_tcp_rate
from propolis_sandbox.bench.common import versions
from propolis_sandbox.bench.host_firewall import measure_host_packet_cost
from propolis_sandbox.bench.socket_lb import connect_latency
from propolis_sandbox.config import SandboxState
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.resources import documents_from

NAMESPACE = "bench-node"
#: the datapath-writer shapes; the watcher and allocator feed it
SERVICES = "k8s-watcher,identity-allocator,datapath-writer"
#: pod -> node index; the annotated pods are on node 1, their peers on node 2
PLACEMENT = {"sender": 0, "receiver": 0, "sink": 1, "source": 1}
ANNOTATED = {"sender": EGRESS_BANDWIDTH, "receiver": INGRESS_BANDWIDTH}
#: (direction shaped, client of the measurement, server of the measurement)
DIRECTIONS = (("egress", "sender", "sink"), ("ingress", "source", "receiver"))


def _pods(state: SandboxState, rate: str | None) -> list[dict[str, Any]]:
    """The workload, the annotated pods carrying `rate` (None: no annotation)."""
    nodes = state.sandbox().node_names()
    return [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": name, "namespace": NAMESPACE,
                          **({"annotations": {ANNOTATED[name]: rate}} if rate and name in ANNOTATED else {})},
             "spec": {"nodeName": nodes[node], "containers": [{"name": "main", "image": "echo"}]}}
            for name, node in PLACEMENT.items()]


async def shaping_accuracy(state: SandboxState, targets: Sequence[str], seconds: float) -> list[dict[str, Any]]:
    """One row per (target, direction, streams): target and measured Mbit/s, error."""
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    await cluster.apply_documents(state, documents_from("bench node", [namespace, *_pods(state, None)]))
    ips = await cluster.wait_running(state, len(PLACEMENT), namespace=NAMESPACE, timeout=90)
    cfg = state.sandbox()
    rows = []
    for target in targets:
        bits = parse_quantity(target, annotation="--targets")
        await cluster.apply_documents(state, documents_from("bench node", _pods(state, target)), dry_run_first=False)
        await cluster.wait(state, timeout=60)  # the writers' kernel state reflects the annotations
        for direction, client, server in DIRECTIONS:
            for streams in (1, 4):
                got = await measure_tcp_rate(client_netns=cfg.pod_netns(NAMESPACE, client),
                                             server_netns=cfg.pod_netns(NAMESPACE, server),
                                             server_ip=ips[f"{NAMESPACE}/{server}"], streams=streams, seconds=seconds)
                rows.append({"target": target, "direction": direction, "streams": streams,
                             "target_mbit_s": bits / 1e6, "measured_mbit_s": round(got.bits_per_second / 1e6, 2),
                             "error_pct": round((got.bits_per_second / bits - 1) * 100, 1)})
    return rows


def run(targets: Sequence[str] = ("10M", "100M"), seconds: float = 3.0, connects: int = 500) -> dict[str, Any]:
    mode = select_mode(probe_all())
    host_firewall = asyncio.run(measure_host_packet_cost())
    with running_sandbox(nodes=2, services=SERVICES) as state:
        rows = asyncio.run(shaping_accuracy(state, targets, seconds)) if targets else []
        socket_lb = asyncio.run(connect_latency(state, connects)) if connects else []
    return {"shaping": {"mode": mode.name, "detail": mode.detail, "seconds_per_measurement": seconds,
                        "rows": rows, "goal": "within ±10 % of the annotation (issue 19)"},
            "host_firewall": {"program": "cil_from_netdev, BPF_PROG_TEST_RUN", "rows": host_firewall},
            "socket_lb": {"connects_per_path": 2 * connects, "rows": socket_lb,
                          "clients": "one process per path and round (2 interleaved rounds), in node 1's cgroup; "
                                     "backends: 2 pods on node 2"},
            "versions": versions()}
