from dataclasses import dataclass

import msgpack
import pytest

from propolis.bus import codec, subjects
from propolis.bus.messages import Heartbeat
from propolis.errors import SchemaVersionError, ValidationError


def _hb(**kw):
    base = dict(service="k8s-watcher", node="n1", instance="abc", version="0.1.0", pid=1,
                started_at=1.0, sent_at=2.0, health="ok")
    base.update(kw)
    return Heartbeat(**base)


def test_round_trip_keeps_every_field():
    hb = _hb(progress={"k8s_resource_version": "42"}, components={"bus": {"state": "ok", "reason": ""}})
    assert codec.decode(codec.encode(hb), Heartbeat) == hb


def test_newer_minor_version_with_unknown_field_is_read():
    fields = ["s", "n", "i", "v", 1, 0.0, 0.0, "ok", {}, "", {}, {}, 5.0]
    raw = msgpack.packb(["heartbeat", 1, 7, *fields, "a field from the future"])
    hb = codec.decode(raw)
    assert isinstance(hb, Heartbeat) and hb.service == "s" and hb.features == {}


def test_older_minor_version_missing_trailing_fields_gets_defaults():
    raw = msgpack.packb(["heartbeat", 1, 0, "s", "n", "i", "v", 1, 0.0, 0.0, "ok"])
    hb = codec.decode(raw)
    assert hb.components == {} and hb.progress == {} and hb.http == ""


def test_to_jsonable_names_the_fields():
    doc = codec.to_jsonable(codec.encode(_hb()))
    assert doc["_schema"] == "heartbeat" and doc["service"] == "k8s-watcher" and doc["health"] == "ok"


def test_unknown_major_version_is_refused_clearly():
    raw = msgpack.packb(["heartbeat", 2, 0, "s"])
    with pytest.raises(SchemaVersionError, match="heartbeat.*major 1"):
        codec.decode(raw)


@pytest.mark.parametrize("data, message", [
    (b"\xc1\xc1\xc1", "malformed msgpack"),
    (msgpack.packb([1, 2, 3]), "no schema envelope"),
    (msgpack.packb({"_s": "heartbeat"}), "no schema envelope"),
    (msgpack.packb(["nope", 1, 0]), "unknown schema 'nope'"),
])
def test_bad_payloads_are_refused_with_the_reason(data, message):
    with pytest.raises(codec.DecodeError, match=message):
        codec.decode(data)


def test_expected_schema_is_enforced():
    @codec.message("test-other", (1, 0))
    @dataclass
    class Other:
        x: int = 0

    with pytest.raises(codec.DecodeError, match="expected schema 'heartbeat'"):
        codec.decode(codec.encode(Other(1)), Heartbeat)


def test_unregistered_class_cannot_be_encoded():
    @dataclass
    class Plain:
        x: int = 0

    with pytest.raises(TypeError):
        codec.encode(Plain())


def test_subjects_are_validated():
    assert subjects.heartbeat_subject("hubble", "node-1") == "propolis.v1.heartbeat.hubble.node-1"
    assert subjects.k8s_key("pods", "production", "web-1", node="w1") == "pods.w1.production.web-1"
    assert subjects.k8s_key("nodes", None, "kind-worker") == "nodes._.kind-worker"
    for bad in ("a.b", "a*", "", "a b", ">"):
        with pytest.raises(ValidationError):
            subjects.heartbeat_subject("hubble", bad)
    for bad in ("a..b", ".a", "a.", "a b", "a*"):
        with pytest.raises(ValidationError):
            subjects.key(bad)


def test_every_slice_writes_its_own_buckets_only():
    owners: dict[str, set[str]] = {}
    for service, sl in subjects.slices().items():
        for bucket, _ in sl.kv_writes:
            if bucket != subjects.HEARTBEATS_BUCKET:
                owners.setdefault(bucket, set()).add(service)
    assert owners and all(len(v) == 1 for v in owners.values()), owners
