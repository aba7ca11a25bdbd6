"""A real Kafka client (aiokafka) run inside a sandbox pod's namespace by the Kafka L7 tests
(`ip netns exec <pod netns> python kafka_client.py BOOTSTRAP ACTION…`); prints one JSON object.

Actions:
  produce TOPIC VALUE…   -> {"ok": true} or {"error": "<aiokafka error class>"}
  consume TOPIC N        -> {"values": [...]} (a group consumer from the earliest offset) or {"error": ...}
  count TOPIC            -> {"count": records in the topic (the sum of its partitions' end offsets)}
  requests KIND:TOPIC…   -> {"error_codes": [[codes]...], "connected": bool}: one connection, one request per
                            argument in order (KIND metadata, fetch, offsets or produce, partition 0), each
                            answered with the non-zero error codes anywhere in its response, or [0]
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaError
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.protocol.offset import OffsetRequest
from aiokafka.protocol.produce import ProduceRequest

TIMEOUT_S = 20.0


async def produce(bootstrap: str, topic: str, *values: str) -> dict:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value.encode())
        return {"ok": True}
    finally:
        await producer.stop()


async def consume(bootstrap: str, topic: str, count: str) -> dict:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"group-{topic}",
                                auto_offset_reset="earliest", request_timeout_ms=10000)
    await consumer.start()
    try:
        values = []
        while len(values) < int(count):
            message = await consumer.getone()
            values.append(message.value.decode())
        await consumer.commit()
        return {"values": sorted(values)}  # partitions interleave: order within a partition only
    finally:
        await consumer.stop()


async def count(bootstrap: str, topic: str) -> dict:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    await consumer.start()
    try:
        await consumer.topics()  # fresh metadata
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return {"count": sum((await consumer.end_offsets(partitions)).values())}
    finally:
        await consumer.stop()


REQUESTS = {
    "metadata": lambda topic: MetadataRequest([topic]),
    "fetch": lambda topic: FetchRequest(100, 1, 1048576, 0, [(topic, [(0, 0, 1048576)])]),
    "offsets": lambda topic: OffsetRequest(-1, 0, [(topic, [(0, -2)])]),
    "produce": lambda topic: ProduceRequest(None, 1, 10000, [(topic, [(0, b"")])]),
}


def error_codes(value: object) -> list[int]:
    """Every non-zero error_code in a decoded response (to_object()), or [0]."""
    found: set[int] = set()

    def walk(v: object) -> None:
        if isinstance(v, dict):
            for key, item in v.items():
                if key == "error_code" and item:
                    found.add(int(item))  # type: ignore[call-overload]
                walk(item)
        elif isinstance(v, list):
            for item in v:
                walk(item)
    walk(value)
    return sorted(found) or [0]


async def requests(bootstrap: str, *wanted: str) -> dict:
    host, port = bootstrap.rsplit(":", 1)
    conn = await create_conn(host, int(port), client_id="propolis-test", request_timeout_ms=10000)
    try:
        codes = []
        for item in wanted:
            kind, topic = item.split(":", 1)
            response = await conn.send(REQUESTS[kind](topic))
            codes.append(error_codes(response.to_object()))
        return {"error_codes": codes, "connected": conn.connected()}
    finally:
        conn.close()


ACTIONS = {"produce": produce, "consume": consume, "count": count, "requests": requests}


async def main(bootstrap: str, action: str, *args: str) -> dict:
    try:
        return await asyncio.wait_for(ACTIONS[action](bootstrap, *args), TIMEOUT_S)
    except KafkaError as exc:
        return {"error": type(exc).__name__, "detail": str(exc)[:200]}
    except TimeoutError:
        return {"error": "timeout"}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:]))), flush=True)
