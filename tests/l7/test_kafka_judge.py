"""Kafka requests as aiokafka encodes them (its own request classes and header code, the versions it uses
with a Kafka 4 broker), judged with Cilium's rule semantics; denied ones answered with a response
aiokafka's own response classes decode (TOPIC_AUTHORIZATION_FAILED, the request's correlation id).
Garbage and lying sizes are one `BadFrame`, never another exception."""

from __future__ import annotations

import struct
import uuid
from io import BytesIO

import pytest
from aiokafka.protocol.commit import OffsetCommitRequest, OffsetFetchRequest
from aiokafka.protocol.coordination import FindCoordinatorRequest
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.protocol.offset import OffsetRequest
from aiokafka.protocol.produce import ProduceRequest
from hypothesis import given, settings
from hypothesis import strategies as st
from kio.index import load_request_schema, load_response_schema
from kio.schema.errors import ErrorCode
from kio.schema.request_header.v2.header import RequestHeader
from kio.serial import entity_reader, entity_writer

from propolis.l7 import kafka
from propolis.policy.parse import parse_policy_object
from propolis.policy.rules import KafkaRule

TOPIC_AUTHORIZATION_FAILED = 29

#: (request, version): what aiokafka 0.14 sends a Kafka 4 broker (ApiVersions-negotiated), and older ones
REQUESTS = {
    "produce": (ProduceRequest(None, 1, 30000, [("user-events", [(0, b"records"), (1, b"more")])]), 7),
    "produce-acks0": (ProduceRequest(None, 0, 30000, [("user-events", [(0, b"records")])]), 7),
    "fetch": (FetchRequest(500, 1, 52428800, 0, [("user-events", [(0, 5, 1048576)]),
                                                  ("order-events", [(2, 0, 1048576)])]), 11),
    "offsets": (OffsetRequest(-1, 0, [("order-events", [(0, -2)])]), 3),
    "metadata": (MetadataRequest(["user-events"]), 5),
    "metadata-all": (MetadataRequest(None), 5),
    "metadata-none": (MetadataRequest([]), 5),
    "offsetcommit": (OffsetCommitRequest("g1", 3, "member-1", -1, [("user-events", [(0, 42, "")])]), 3),
    "offsetfetch": (OffsetFetchRequest("g1", [("user-events", [0, 1])]), 3),
    "findcoordinator": (FindCoordinatorRequest("g1", 0), 1),
}


def encode(name: str, *, correlation_id: int = 4242, client_id: str = "aiokafka-0.14.0"):
    """The frame aiokafka's connection writes for this request (conn.py: header + struct, size prefix)."""
    request, version = REQUESTS[name]
    request_struct = request.prepare({request.API_KEY: (version, version)})
    message = request_struct.build_request_header(correlation_id=correlation_id, client_id=client_id).encode()
    message += request_struct.encode()
    return struct.pack(">i", len(message)) + message, request_struct


def parsed(name: str, **kw) -> kafka.KafkaRequest:
    return kafka.parse_request(encode(name, **kw)[0])


def rules(*docs: dict) -> tuple[kafka.KafkaRuleMatcher, ...]:
    return kafka.compile_rules(KafkaRule(role=d.get("role", ""), api_key=d.get("apiKey", ""),
                                         api_version=d.get("apiVersion", ""), client_id=d.get("clientID", ""),
                                         topic=d.get("topic", "")) for d in docs)


#: the seed's Kafka example (cilium-deep-dive: consume only user-events and order-events)
SEED = rules({"role": "consume", "topic": "user-events"}, {"role": "consume", "topic": "order-events"})


def test_headers_and_topics_of_real_client_requests():
    req = parsed("produce", correlation_id=7, client_id="producer-1")
    assert (req.api_key, req.api_key_name, req.api_version, req.correlation_id, req.client_id) == \
        (0, "produce", 7, 7, "producer-1")
    assert req.topics == ("user-events",) and req.expects_response
    assert not parsed("produce-acks0").expects_response
    assert parsed("fetch").topics == ("user-events", "order-events")
    assert parsed("offsets").topics == ("order-events",)
    assert parsed("metadata").topics == ("user-events",)
    assert parsed("metadata-all").topics == () and parsed("metadata-none").topics == ()
    assert parsed("offsetcommit").topics == ("user-events",)
    assert parsed("offsetfetch").topics == ("user-events",)
    find = parsed("findcoordinator")
    assert (find.api_key_name, find.topics, find.body) == ("findcoordinator", (), None)


def test_roles_expand_to_ciliums_api_keys():
    assert kafka.ROLE_API_KEYS["produce"] == {kafka.API_KEYS[k] for k in ("produce", "metadata", "apiversions")}
    assert kafka.ROLE_API_KEYS["consume"] == {kafka.API_KEYS[k] for k in (
        "fetch", "offsets", "metadata", "offsetcommit", "offsetfetch", "findcoordinator", "joingroup",
        "heartbeat", "leavegroup", "syncgroup", "apiversions")}


def test_the_seed_kafka_rules():
    assert kafka.allowed(SEED, parsed("fetch"))  # both topics: each allowed by one rule
    assert kafka.allowed(SEED, parsed("offsets")) and kafka.allowed(SEED, parsed("metadata"))
    assert kafka.allowed(SEED, parsed("offsetcommit")) and kafka.allowed(SEED, parsed("offsetfetch"))
    assert kafka.allowed(SEED, parsed("findcoordinator"))  # carries no topic: the topic does not apply
    assert not kafka.allowed(SEED, parsed("produce"))  # not in the consume role
    assert not kafka.allowed(SEED, parsed("metadata-all"))  # names no topic a rule allows (as Cilium)
    assert not kafka.allowed(rules({"role": "consume", "topic": "user-events"}), parsed("fetch"))  # one of two
    assert not kafka.allowed((), parsed("findcoordinator"))  # no rule: denied


def test_api_key_version_and_client_id():
    assert kafka.allowed(rules({}), parsed("produce"))  # an empty rule allows everything
    assert kafka.allowed(rules({"apiKey": "Produce"}), parsed("produce"))  # case-insensitive, as Cilium
    assert not kafka.allowed(rules({"apiKey": "fetch"}), parsed("produce"))
    assert kafka.allowed(rules({"apiKey": "produce", "apiVersion": "7"}), parsed("produce"))
    assert not kafka.allowed(rules({"apiKey": "produce", "apiVersion": "8"}), parsed("produce"))
    assert kafka.allowed(rules({"role": "produce", "clientID": "p1"}), parsed("produce", client_id="p1"))
    assert not kafka.allowed(rules({"role": "produce", "clientID": "p1"}), parsed("produce", client_id="p2"))
    assert kafka.allowed(rules({"role": "produce", "topic": "user-events"}), parsed("produce"))
    assert not kafka.allowed(rules({"role": "produce", "topic": "order-events"}), parsed("produce"))


def test_the_policy_parser_feeds_the_judge():
    policy = parse_policy_object("CiliumNetworkPolicy", {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "k", "namespace": "d"},
        "spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{
            "ports": [{"port": "9092", "protocol": "TCP"}],
            "rules": {"kafka": [{"role": "consume", "topic": "user-events"},
                                {"role": "consume", "topic": "order-events"}]}}]}]}})
    kafka_rules = policy.rules[0].ingress[0].to_ports[0].rules.kafka
    assert kafka.compile_rules(kafka_rules) == SEED
    mixed_case = parse_policy_object("CiliumNetworkPolicy", {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "k", "namespace": "d"},
        "spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{
            "ports": [{"port": "9092", "protocol": "TCP"}],
            "rules": {"kafka": [{"role": "Produce"}, {"apiKey": "OffsetFetch", "apiVersion": "3"}]}}]}]}})
    produce, offsetfetch = kafka.compile_rules(mixed_case.rules[0].ingress[0].to_ports[0].rules.kafka)
    assert produce.api_keys == kafka.ROLE_API_KEYS["produce"]
    assert (offsetfetch.api_keys, offsetfetch.api_version) == (frozenset({9}), 3)


def decode_answer(name: str, request: kafka.KafkaRequest):
    """Our answer as aiokafka's connection reads it: size, response header, then its response class."""
    _, request_struct = encode(name)
    frame = kafka.denied_response(request)
    assert frame is not None
    (size,) = struct.unpack_from(">i", frame)
    assert size == len(frame) - 4
    buf = BytesIO(frame[4:])
    header = request_struct.parse_response_header(buf)
    response = request_struct.RESPONSE_TYPE.decode(buf)
    assert buf.read() == b""  # nothing left over: the size was right
    return header.correlation_id, response.to_object()


@pytest.mark.parametrize("name", ["produce", "fetch", "offsets", "metadata", "offsetcommit", "offsetfetch"])
def test_denied_answer_has_the_error_in_every_topic_and_partition(name):
    request = parsed(name)
    correlation_id, response = decode_answer(name, request)
    assert correlation_id == request.correlation_id
    topics = next(v for k, v in response.items() if k in ("topics", "responses", "topic_data"))
    names = [next(v for k, v in t.items() if k in ("topic", "topics", "name")) for t in topics]
    assert names == list(request.topics)
    for topic in topics:
        if name == "metadata":  # the error is the topic's, with no partition
            assert topic["error_code"] == TOPIC_AUTHORIZATION_FAILED and topic["partitions"] == []
            continue
        partitions = next(v for k, v in topic.items() if k in ("partitions", "partition_responses"))
        assert partitions and all(p["error_code"] == TOPIC_AUTHORIZATION_FAILED for p in partitions)


def test_denied_answer_of_a_topicless_api_uses_its_error_field():
    request = parsed("findcoordinator")
    correlation_id, response = decode_answer("findcoordinator", request)
    assert (correlation_id, response["error_code"]) == (request.correlation_id, TOPIC_AUTHORIZATION_FAILED)
    assert kafka.denied_response(parsed("produce-acks0")) is None  # acks=0 expects nothing
    # an API whose response has neither topics the proxy fills nor an error field: no answer (the proxy closes)
    create_topics = parsed("findcoordinator")
    create_topics.api_key, create_topics.api_version = kafka.API_KEYS["createtopics"], 5
    assert kafka.denied_response(create_topics) is None


def test_lying_sizes_and_garbage_are_bad_frames():
    frame, _ = encode("produce")
    with pytest.raises(kafka.BadFrame, match="over the limit"):
        kafka.frame_size(struct.pack(">i", kafka.MAX_REQUEST_BYTES + 1))
    with pytest.raises(kafka.BadFrame, match="shorter"):
        kafka.frame_size(struct.pack(">i", 3))
    with pytest.raises(kafka.BadFrame):
        kafka.parse_request(frame[:-3])  # the body ends early
    with pytest.raises(kafka.BadFrame):
        kafka.parse_request(frame + b"xyz")  # more than the body holds
    with pytest.raises(kafka.BadFrame):
        kafka.parse_request(struct.pack(">ihhih", 11, 0, 7, 1, 500) + b"abc")  # client id longer than the frame


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_garbage_never_crashes(data):
    judged_or_refused(struct.pack(">i", len(data)) + data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(REQUESTS)), st.data())
def test_fuzz_mutated_real_requests_never_crash(name, data):
    frame = bytearray(encode(name)[0])
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(4, len(frame) - 1))
        frame[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(4 + kafka.HEADER_BYTES, len(frame)))
    judged_or_refused(bytes(frame[:cut]))


def judged_or_refused(frame: bytes) -> None:
    """What the proxy does with any bytes: refuse them as a BadFrame, or judge the request (a verdict, the frame
    kept as received) and answer a denied one, if at all, with a whole frame under the request's correlation id."""
    try:
        request = kafka.parse_request(frame)
    except kafka.BadFrame:
        return
    assert request.frame == frame
    assert kafka.allowed(SEED, request) in (True, False)
    answer = kafka.denied_response(request)
    if answer is not None:
        size, correlation_id = struct.unpack_from(">ii", answer)
        assert (size, correlation_id) == (len(answer) - 4, request.correlation_id)


def api_versions_response(version: int, offered: dict[int, int], correlation_id: int = 9) -> bytes:
    """A broker's ApiVersions response (after its size prefix), encoded with kio."""
    response_type = load_response_schema(18, version)
    key_type = kafka._item_type(response_type, "api_keys")
    keys = tuple(key_type(api_key=k, min_version=0, max_version=v) for k, v in offered.items())
    out = BytesIO()
    entity_writer(response_type)(out, kafka._build(response_type, {"api_keys": keys, "error_code": ErrorCode.none}))
    return struct.pack(">i", correlation_id) + out.getvalue()


@pytest.mark.parametrize("version", [0, 2, 3])
def test_api_versions_offer_only_versions_that_name_topics(version):
    """Fetch/Produce v13+ name topics by id and OffsetFetch v8+ nests them in groups: a client offered those
    would send requests no topic rule can match, so the proxy's relay lowers them."""
    offered = {0: 13, 1: 18, 2: 11, 3: 13, 8: 10, 9: 10, 18: 4, 11: 9}
    capped = kafka.cap_api_versions(api_versions_response(version, offered), version)
    assert capped is not None and struct.unpack_from(">i", capped)[0] == 9  # correlation id kept
    response, _ = entity_reader(load_response_schema(18, version))(capped, 4)
    got = {int(k.api_key): int(k.max_version) for k in response.api_keys}
    assert got == {0: 12, 1: 12, 2: 11, 3: 13, 8: 9, 9: 7, 18: 4, 11: 9}
    if version <= 2:  # what aiokafka (which speaks ApiVersions v0-v2) reads from it
        from aiokafka.protocol import admin
        buf = BytesIO(capped)
        getattr(admin, f"ApiVersionRequest_v{version}")().parse_response_header(buf)
        decoded = getattr(admin, f"ApiVersionResponse_v{version}").decode(buf)
        assert {k: v for k, _, v in decoded.api_versions} == got
    assert kafka.cap_api_versions(b"\x00\x00\x00\x09garbage", version) is None  # relayed as it came


def test_a_topic_named_only_by_id_matches_no_topic_rule():
    """Metadata v10+ may name a topic by id only: it must not ride along with an allowed named topic."""
    schema = load_request_schema(3, 12)
    topic_type = kafka._item_type(schema, "topics")
    body = schema(topics=(topic_type(name="user-events", topic_id=uuid.UUID(int=0)),
                          topic_type(name=None, topic_id=uuid.uuid4())),
                  allow_auto_topic_creation=False, include_topic_authorized_operations=False)
    out = BytesIO()
    entity_writer(RequestHeader)(out, RequestHeader(request_api_key=3, request_api_version=12, correlation_id=1,
                                                    client_id="java"))
    entity_writer(schema)(out, body)
    request = kafka.parse_request(struct.pack(">i", len(out.getvalue())) + out.getvalue())
    assert request.topics == ("user-events", "")
    assert not kafka.allowed(SEED, request)
    assert kafka.allowed(rules({"role": "consume"}), request)  # a rule without topic allows it, as in Cilium
