"""Hubble L7 flows of the proxy (Cilium's proxy access log, as Hubble shows it).

The proxy builds each record (`http_flow`: Type L7, `l7.type` REQUEST or RESPONSE, `l7.http`
{code, method, url, protocol, headers}, `l7.latency_ns`, verdict FORWARDED/DROPPED; a denied
request is a DROPPED REQUEST with code 403, as Cilium logs it) and publishes it on its node's
access-log subject; that node's Hubble observer enriches both ends (`hubble.flow.enrich_proxy_flow`) and handles it like
every flow (ring, metrics, bus, queries), so `propolis observe --protocol http --http-status 403`
finds it. Kafka requests are REQUEST flows with `l7.kafka` {error_code, api_version, api_key,
correlation_id, topic} (`kafka_flow`): FORWARDED with error_code 0, DROPPED with 29. The dns-proxy's
queries and answers carry `l7.dns` {query, ips, ttl, cnames, observation_source, rcode, qtypes, rrtypes}
(`dns_flow`); a refused query is a DROPPED REQUEST (and its answer, rcode 5, a RESPONSE).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from propolis.bus import codec, subjects
from propolis.bus.messages import FlowMessage
from propolis.hubble.flow import rfc3339
from propolis.l7.http import Head
from propolis.l7.kafka import KafkaRequest

TYPE_L7 = "L7"
L7_EVENT_TYPE = 129  # Cilium's MessageTypeAccessLog


def _url(request: Head, server: tuple[str, int]) -> str:
    host = request.host or f"{server[0]}:{server[1]}"
    return f"http://{host}{request.url}"


def http_flow(*, node: str, direction: str, client: tuple[str, int], server: tuple[str, int],
              client_identity: int, server_identity: int, request: Head, response: Head | None,
              verdict: str, latency_ns: int) -> dict[str, Any]:
    """One L7 flow: the request (response None) or its response."""
    is_reply = response is not None
    code = response.status if response is not None else (403 if verdict == "DROPPED" else 0)
    src, dst = (server, client) if is_reply else (client, server)
    src_id, dst_id = (server_identity, client_identity) if is_reply else (client_identity, server_identity)
    headers = (response or request).headers
    url = _url(request, server)
    http = {"code": code, "method": request.method, "url": url, "protocol": f"HTTP/{request.version}",
            "headers": [{"key": k, "value": v} for k, v in headers[:32]]}
    if is_reply:
        summary = f"HTTP/{request.version} {code} {latency_ns // 1_000_000}ms ({request.method} {url})"
    else:
        summary = f"HTTP/{request.version} {request.method} {url}"
    return _l7_flow(node=node, direction=direction, src=src, dst=dst, src_identity=src_id, dst_identity=dst_id,
                    verdict=verdict, is_reply=is_reply, latency_ns=latency_ns, record=("http", http),
                    summary=summary)


def kafka_flow(*, node: str, direction: str, client: tuple[str, int], server: tuple[str, int],
               client_identity: int, server_identity: int, request: KafkaRequest, verdict: str,
               error_code: int) -> dict[str, Any]:
    """One Kafka request as an L7 flow (`l7.kafka`, Hubble's Kafka record: one topic, the first)."""
    record = {"error_code": error_code, "api_version": request.api_version, "api_key": request.api_key_name,
              "correlation_id": request.correlation_id, "topic": request.topics[0] if request.topics else ""}
    topics = f" topic {','.join(request.topics)}" if request.topics else ""
    summary = (f"Kafka request {request.api_key_name} v{request.api_version} correlation id "
               f"{request.correlation_id}{topics}" + (f" error {error_code}" if error_code else ""))
    return _l7_flow(node=node, direction=direction, src=client, dst=server, src_identity=client_identity,
                    dst_identity=server_identity, verdict=verdict, is_reply=False, latency_ns=0,
                    record=("kafka", record), summary=summary)


def dns_flow(*, node: str, client: tuple[str, int], server: tuple[str, int], client_identity: int,
             server_identity: int, transport: str, query: str, qtypes: list[str], verdict: str,
             rcode: int | None = None, ips: list[str] | None = None, ttl: int = 0, latency_ns: int = 0) -> dict[str, Any]:
    """One DNS query (rcode None) or its answer as the dns-proxy saw it (`l7.dns`, observation_source proxy)."""
    is_reply = rcode is not None
    record = {"query": query, "ips": list(ips or []), "ttl": ttl, "cnames": [], "observation_source": "proxy",
              "rcode": rcode or 0, "qtypes": qtypes, "rrtypes": ["A"] if ips else []}
    kind = " ".join(qtypes)
    summary = (f"DNS Answer \"{','.join(ips or [])}\" TTL: {ttl} (Proxy {query} {kind})" if is_reply and not rcode
               else f"DNS Answer RCode: {_RCODE_NAMES.get(rcode or 0, rcode)} (Proxy {query} {kind})" if is_reply
               else f"DNS Query {query} {kind}")
    src, dst = (server, client) if is_reply else (client, server)
    src_id, dst_id = (server_identity, client_identity) if is_reply else (client_identity, server_identity)
    return _l7_flow(node=node, direction="egress", src=src, dst=dst, src_identity=src_id, dst_identity=dst_id,
                    verdict=verdict, is_reply=is_reply, latency_ns=latency_ns, record=("dns", record),
                    summary=summary, transport=transport)


_RCODE_NAMES = {1: "Format Error", 2: "Server Failure", 3: "Non-Existent Domain", 5: "Refused"}


def _l7_flow(*, node: str, direction: str, src: tuple[str, int], dst: tuple[str, int], src_identity: int,
             dst_identity: int, verdict: str, is_reply: bool, latency_ns: int, record: tuple[str, dict[str, Any]],
             summary: str, transport: str = "TCP") -> dict[str, Any]:
    """The flow around one protocol record (`l7.<protocol>`), as the proxy's access log makes it."""
    return {
        "time": rfc3339(time.time()),
        "verdict": verdict,
        "IP": {"source": src[0], "destination": dst[0], "ipVersion": "IPv4"},
        "l4": {transport: {"source_port": src[1], "destination_port": dst[1]}},
        "source": {"identity": src_identity},
        "destination": {"identity": dst_identity},
        "Type": TYPE_L7,
        "node_name": node,
        "event_type": {"type": L7_EVENT_TYPE},
        "traffic_direction": "INGRESS" if direction == "ingress" else "EGRESS",
        "is_reply": is_reply,
        "l7": {"type": "RESPONSE" if is_reply else "REQUEST", "latency_ns": latency_ns, record[0]: record[1]},
        "Summary": summary,
    }


def publish_flow(rt: Any, node: str, flow: dict[str, Any]) -> None:
    """Hand a proxy's flow to its node's Hubble observer (the access-log subject), without waiting:
    NATS away = the flow is lost, never the request."""
    message = codec.encode(FlowMessage(node, rt.instance, 0, flow))
    task = asyncio.ensure_future(rt.bus.publish_raw(subjects.accesslog_subject(node), message))
    task.add_done_callback(lambda t: t.exception())
