"""Kafka for the L7 proxy: Cilium's Kafka rule semantics, request frames and the answers to denied requests.

Rules (`KafkaRuleMatcher`, Cilium's `kafka.PortRule` as its Kafka proxy enforces it): `role` expands to API
keys exactly as Cilium's `GetAPIKeys` (produce: Produce, Metadata, ApiVersions; consume: Fetch, ListOffsets,
Metadata, OffsetCommit, OffsetFetch, FindCoordinator, JoinGroup, Heartbeat, LeaveGroup, SyncGroup,
ApiVersions); `apiKey` is one key by Cilium's name; `apiVersion` and `clientID` must be equal; `topic`
applies only to the API keys Cilium lists as carrying topics, and every topic of a request must be allowed
by some rule (a topic-carrying request with no topic it could name, e.g. Metadata for all topics, matches
no topic rule). A request is allowed when the rules together allow it; no rule = denied.

Frames (`read_request`): a request is `int32 size` + header (`api_key`, `api_version`, `correlation_id`,
`client_id`) + body. The header and, for the APIs whose topics Cilium reads (Produce, Fetch, ListOffsets,
Metadata, OffsetCommit, OffsetFetch), the body are decoded with `kio` (the Kafka protocol's own JSON
schemas, every version Kafka 4 speaks). A frame over `MAX_REQUEST_BYTES`, shorter than a header, or a body
that does not decode is `BadFrame`: the proxy closes the connection, having read at most one frame.

Denied (`denied_response`): the API's own response with `TOPIC_AUTHORIZATION_FAILED` (29) in every topic
and partition of the request (or in its top-level error field), the request's correlation id and version,
as Cilium's `CreateAuthErrorResponse`; `None` when the API's response cannot carry it (the proxy then
closes). Produce with acks=0 expects no response and gets none.

Threat model: every byte comes from an untrusted pod. The size prefix is checked before anything is
read, kio reads within the frame only, and every decoding error is one `BadFrame`.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import struct
import typing
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from functools import cache, lru_cache
from typing import Any

from kio.index import load_request_schema, load_response_schema
from kio.schema.errors import ErrorCode
from kio.schema.request_header.v1.header import RequestHeader as RequestHeaderV1
from kio.schema.request_header.v2.header import RequestHeader as RequestHeaderV2
from kio.serial import entity_reader, entity_writer

from propolis.policy.rules import KafkaRule

#: Largest request frame the proxy reads (Kafka clients' default max.request.size is 1 MiB; Envoy's
#: Kafka filter and Cilium's proxy read whole requests as well): one frame in memory per connection.
MAX_REQUEST_BYTES = 1024 * 1024
HEADER_BYTES = 10  # api_key, api_version, correlation_id: the least a request frame holds
TOPIC_AUTHORIZATION_FAILED = int(ErrorCode.topic_authorization_failed)

#: Cilium's API key names (`kafka.APIKeyMap`), the names `rules.kafka[].apiKey` uses
API_KEYS: dict[str, int] = {
    "produce": 0, "fetch": 1, "offsets": 2, "metadata": 3, "leaderandisr": 4, "stopreplica": 5,
    "updatemetadata": 6, "controlledshutdown": 7, "offsetcommit": 8, "offsetfetch": 9, "findcoordinator": 10,
    "joingroup": 11, "heartbeat": 12, "leavegroup": 13, "syncgroup": 14, "describegroups": 15,
    "listgroups": 16, "saslhandshake": 17, "apiversions": 18, "createtopics": 19, "deletetopics": 20,
    "deleterecords": 21, "initproducerid": 22, "offsetforleaderepoch": 23, "addpartitionstotxn": 24,
    "addoffsetstotxn": 25, "endtxn": 26, "writetxnmarkers": 27, "txnoffsetcommit": 28, "describeacls": 29,
    "createacls": 30, "deleteacls": 31, "describeconfigs": 32, "alterconfigs": 33,
}
API_KEY_NAMES = {number: name for name, number in API_KEYS.items()}

#: `role` -> API keys, as Cilium's `PortRule.GetAPIKeys`
ROLE_API_KEYS: dict[str, frozenset[int]] = {
    "produce": frozenset({0, 3, 18}),
    "consume": frozenset({1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18}),
}

#: API keys whose requests carry topics (Cilium's `isTopicAPIKey`): a rule's `topic` applies to these only
TOPIC_API_KEYS = frozenset({0, 1, 2, 3, 4, 5, 6, 8, 9, 19, 20, 21, 23, 24, 27, 28, 34, 35, 37})


@dataclass(frozen=True)
class _TopicShape:
    """Where an API keeps its topics: request and response topic arrays and, in them, the partitions."""

    request_topics: str
    request_partitions: str | None
    response_topics: str
    response_partitions: str | None


#: The APIs whose topics Cilium reads and answers (its Kafka library's request kinds)
TOPIC_SHAPES: dict[int, _TopicShape] = {
    0: _TopicShape("topic_data", "partition_data", "responses", "partition_responses"),
    1: _TopicShape("topics", "partitions", "responses", "partitions"),
    2: _TopicShape("topics", "partitions", "topics", "partitions"),
    3: _TopicShape("topics", None, "topics", None),
    8: _TopicShape("topics", "partitions", "topics", "partitions"),
    9: _TopicShape("topics", "partition_indexes", "topics", "partitions"),
}
_TOPIC_ID_FIELDS = ("name", "topic", "topic_id")  # how a topic entry names its topic (same in the response)
_PARTITION_ID_FIELDS = ("partition_index", "index", "partition")


class BadFrame(Exception):
    """The bytes are not a Kafka request this proxy accepts (what is wrong in the message)."""


@dataclass
class KafkaRequest:
    """One request frame: its header, the topics Cilium's rules look at, and the decoded body (if any)."""

    api_key: int
    api_version: int
    correlation_id: int
    client_id: str
    topics: tuple[str, ...]
    frame: bytes  # the whole frame, size prefix included: forwarded as received
    body: Any = None  # the kio request entity, for the APIs in TOPIC_SHAPES

    @property
    def api_key_name(self) -> str:
        return API_KEY_NAMES.get(self.api_key, str(self.api_key))

    @property
    def expects_response(self) -> bool:
        """Produce with acks=0 is the one request Kafka answers with nothing."""
        return not (self.api_key == 0 and self.body is not None and int(self.body.acks) == 0)


def frame_size(prefix: bytes) -> int:
    """The size a request frame announces, checked before a byte of it is read."""
    size: int = struct.unpack(">i", prefix)[0]
    if size < HEADER_BYTES:
        raise BadFrame(f"request size {size} is shorter than a request header")
    if size > MAX_REQUEST_BYTES:
        raise BadFrame(f"request size {size} is over the limit of {MAX_REQUEST_BYTES} bytes")
    return size


@lru_cache(maxsize=1024)  # bounded: the key and version come from the client
def _request_schema(api_key: int, api_version: int) -> Any:
    try:
        return load_request_schema(api_key, api_version)
    except Exception:  # noqa: BLE001 - kio's UnknownAPIKey/UnknownEntity: a version kio does not know
        return None


def parse_request(frame: bytes) -> KafkaRequest:
    """Decode one whole frame (size prefix included); `BadFrame` says why it is not a request."""
    if len(frame) < 4 + HEADER_BYTES:
        raise BadFrame("frame shorter than a request header")
    api_key, api_version = struct.unpack_from(">hh", frame, 4)
    schema = _request_schema(api_key, api_version)
    header_type: type[RequestHeaderV1 | RequestHeaderV2] = (
        RequestHeaderV2 if schema is not None and schema.__flexible__ else RequestHeaderV1)
    try:
        header, header_size = entity_reader(header_type)(frame, 4)
    except Exception as exc:  # noqa: BLE001 - kio raises several kinds on bad bytes
        raise BadFrame(f"request header: {type(exc).__name__}: {exc}") from None
    request = KafkaRequest(api_key, api_version, int(header.correlation_id), header.client_id or "", (), frame)
    shape = TOPIC_SHAPES.get(api_key)
    if shape is None or schema is None:
        return request  # no topics Cilium reads (or a version kio does not know: no topic is known)
    try:
        body, body_size = entity_reader(schema)(frame, 4 + header_size)
    except Exception as exc:  # noqa: BLE001
        raise BadFrame(f"{request.api_key_name} v{api_version} body: {type(exc).__name__}: {exc}") from None
    if 4 + header_size + body_size != len(frame):
        raise BadFrame(f"{request.api_key_name} v{api_version}: size prefix does not match the body")
    request.body = body
    entries = getattr(body, shape.request_topics, None) or ()
    # a topic named only by id is "": no topic rule allows it, so the request needs a rule without topic
    request.topics = tuple(t if isinstance(t, str) else "" for t in
                           (getattr(e, "name", None) or getattr(e, "topic", None) for e in entries))
    return request


# --- versions that name their topics ---------------------------------------------------------------
@cache
def named_topic_max_versions() -> dict[int, int]:
    """API key -> the highest version whose requests name their topics where Cilium reads them (newer Fetch,
    Produce, OffsetCommit name topics by id, OffsetFetch nests them in groups): from kio's schemas."""
    from kio.schema.index import api_key_map, schema_name_map
    caps = {}
    for api_key, shape in TOPIC_SHAPES.items():
        named = [v for v in schema_name_map[api_key_map[api_key]] if _names_topics(api_key, v, shape)]
        caps[api_key] = max(named)
    return caps


def _names_topics(api_key: int, version: int, shape: _TopicShape) -> bool:
    fields = {f.name for f in dataclasses.fields(load_request_schema(api_key, version))}
    if shape.request_topics not in fields:
        return False
    topic_type = _item_type(load_request_schema(api_key, version), shape.request_topics)
    return any(f.name in ("name", "topic") for f in dataclasses.fields(topic_type))


def cap_api_versions(response: bytes, api_version: int) -> bytes | None:
    """An ApiVersions response (after its size prefix) offering no version whose topics this proxy cannot
    name (`named_topic_max_versions`), so clients send names; None if it does not decode (relay it as is)."""
    try:
        response_type = load_response_schema(API_KEYS["apiversions"], api_version)
        body: Any  # the ApiVersionsResponse of `api_version`: kio types the loader's answer as any response
        body, size = entity_reader(response_type)(response, 4)  # header v0: the correlation id only
        if 4 + size != len(response):
            return None
        caps = named_topic_max_versions()
        keys = tuple(dataclasses.replace(k, max_version=type(k.max_version)(min(k.max_version, caps[k.api_key])))
                     if k.api_key in caps and k.max_version > caps[k.api_key] else k for k in body.api_keys)
        out = io.BytesIO()
        entity_writer(response_type)(out, dataclasses.replace(body, api_keys=keys))
    except Exception:  # noqa: BLE001 - a broker's answer kio does not read: leave it alone
        return None
    return response[:4] + out.getvalue()


# --- rules -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KafkaRuleMatcher:
    """One `rules.kafka[]` entry, compiled (empty api_keys = every key, api_version None = every version)."""

    api_keys: frozenset[int] = frozenset()
    api_version: int | None = None
    client_id: str = ""
    topic: str = ""

    def matches_header(self, request: KafkaRequest) -> bool:
        return ((not self.api_keys or request.api_key in self.api_keys)
                and (self.api_version is None or request.api_version == self.api_version)
                and (not self.client_id or request.client_id == self.client_id))


def compile_rules(rules: Iterable[KafkaRule]) -> tuple[KafkaRuleMatcher, ...]:
    """Parsed rules (validated by policy.parse) as matchers."""
    out = []
    for rule in rules:
        if rule.role:
            keys = ROLE_API_KEYS[rule.role.lower()]
        elif rule.api_key:
            keys = frozenset({API_KEYS[rule.api_key.lower()]})
        else:
            keys = frozenset()
        out.append(KafkaRuleMatcher(keys, int(rule.api_version) if rule.api_version else None, rule.client_id,
                                    rule.topic))
    return tuple(out)


def allowed(rules: Iterable[KafkaRuleMatcher], request: KafkaRequest) -> bool:
    """Cilium's `Rule.Matches` over the rules: a topic rule allows its topic; all topics must be allowed."""
    remaining = set(request.topics)
    for rule in rules:
        if not rule.matches_header(request):
            continue
        if rule.topic and request.api_key in TOPIC_API_KEYS:
            if rule.topic in remaining:
                remaining.discard(rule.topic)
                if not remaining:
                    return True
            continue
        return True
    return False


# --- answers to denied requests ------------------------------------------------------------------
_BUILTIN_ZEROS: tuple[tuple[type, object], ...] = ((bool, False), (int, 0), (str, ""), (bytes, b""), (float, 0.0))


def _zero(annotation: Any) -> Any:
    """The neutral value of a kio field type (for required fields an error answer has no value for)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is tuple or any(typing.get_origin(a) is tuple for a in args):
        return ()  # an empty array, also where null is allowed (clients iterate it)
    if type(None) in args:
        return None
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return _build(annotation, {})
    if isinstance(annotation, type):
        if issubclass(annotation, Enum):
            return annotation(0)
        if issubclass(annotation, datetime.timedelta):
            return annotation.parse(datetime.timedelta(0)) if hasattr(annotation, "parse") else datetime.timedelta(0)
        if issubclass(annotation, uuid.UUID):
            return uuid.UUID(int=0)
        for base, zero in _BUILTIN_ZEROS:
            if issubclass(annotation, base):  # kio's int32, str, bytes... subclasses: built from the base's zero
                return typing.cast(Callable[[object], Any], annotation)(zero)
    raise TypeError(f"no neutral value for {annotation!r}")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _item_type(cls: type, name: str) -> Any:
    annotation = _hints(cls)[name]
    for arg in typing.get_args(annotation) or ():
        if typing.get_origin(arg) is tuple:
            annotation = arg
    return typing.get_args(annotation)[0]


def _build(cls: type, values: dict[str, Any]) -> Any:
    """An instance of a kio entity: `values`, every `error_code` TOPIC_AUTHORIZATION_FAILED unless given,
    every other required field neutral."""
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            kwargs[f.name] = values[f.name]
        elif f.name == "error_code":
            kwargs[f.name] = ErrorCode.topic_authorization_failed
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs[f.name] = _zero(_hints(cls)[f.name])
    return cls(**kwargs)


def _first_field(entity_type: type, candidates: tuple[str, ...]) -> str:
    """The first of `candidates` that `entity_type` has (versions and APIs name the same thing differently)."""
    names = {f.name for f in dataclasses.fields(entity_type)}
    found = next((n for n in candidates if n in names), None)
    if found is None:
        raise TypeError(f"{entity_type.__name__} has none of {', '.join(candidates)}")
    return found


def _partition_index(partition: Any) -> int:
    if isinstance(partition, int):  # OffsetFetch lists bare partition indexes
        return partition
    return int(getattr(partition, _first_field(type(partition), _PARTITION_ID_FIELDS)))


def _topic_entries(request: KafkaRequest, shape: _TopicShape, response_type: type) -> tuple[Any, ...]:
    """The response's topic array: each request topic (named as the request names it) and its partitions."""
    topic_type = _item_type(response_type, shape.response_topics)
    partition_type = _item_type(topic_type, shape.response_partitions) if shape.response_partitions else None
    entries = []
    for topic in getattr(request.body, shape.request_topics, None) or ():
        name_field = _first_field(type(topic), _TOPIC_ID_FIELDS)
        values: dict[str, Any] = {name_field: getattr(topic, name_field)}
        if partition_type is not None and shape.request_partitions and shape.response_partitions:
            index_field = _first_field(partition_type, _PARTITION_ID_FIELDS)
            values[shape.response_partitions] = tuple(
                _build(partition_type, {index_field: _partition_index(p)})
                for p in getattr(topic, shape.request_partitions, None) or ())
        entries.append(_build(topic_type, values))
    return tuple(entries)


def denied_response(request: KafkaRequest) -> bytes | None:
    """The frame answering a denied request (size prefix included), or None when none can be built."""
    if not request.expects_response:
        return None
    try:
        response_type = load_response_schema(request.api_key, request.api_version)
        shape = TOPIC_SHAPES.get(request.api_key)
        values: dict[str, Any] = {}
        has_error_field = any(f.name == "error_code" for f in dataclasses.fields(response_type))
        if shape is None and not has_error_field:
            return None  # e.g. CreateTopics: an empty answer would look like success for nothing
        if shape is not None:
            if request.body is None:
                return None
            values[shape.response_topics] = _topic_entries(request, shape, response_type)
            if has_error_field:
                values["error_code"] = ErrorCode.none  # the error is in each topic, as Cilium answers
        response = _build(response_type, values)
        body = io.BytesIO()
        entity_writer(response_type)(body, response)
    except Exception:  # noqa: BLE001 - an API or version whose response has no place for the error
        return None
    # response header v1 (tagged fields) for flexible versions, except ApiVersions (always v0)
    header = struct.pack(">i", request.correlation_id)
    if response_type.__flexible__ and request.api_key != API_KEYS["apiversions"]:
        header += b"\x00"
    payload = header + body.getvalue()
    return struct.pack(">i", len(payload)) + payload
