"""Poison bus data is a per-key error: refused at decode (the codec checks every field's declared type),
skipped by the KV watch (the consumer keeps the last good value, the watch stays alive), counted and
shown in health. Through a real nats-server: the poison is put with an admin connection."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from propolis.bus import codec, subjects
from propolis.bus import kv as kv_mod
from propolis.bus.connection import Bus
from propolis.bus.kv import EventType
from propolis.bus.messages import EndpointRecord, Heartbeat, K8sObject, Watermark

#: (what, payload, the field the error must name)
POISON = [
    ("truncated k8s-object", msgpack.packb(["k8s-object", 1, 0]), "lacks required fields kind"),
    ("watermark 'abc'", msgpack.packb(["watermark", 1, 0, "abc", 1.0]), "'resource_version': expected int"),
    ("endpoint ips a string", msgpack.packb(["endpoint", 1, 0, "ns", "pod", "n1", "10.0.0.1", 7, []]),
     "'ips': expected list[str], got str"),
    ("endpoint ips with a number", msgpack.packb(["endpoint", 1, 0, "ns", "pod", "n1", ["10.0.0.1", 5], 7, []]),
     "'ips': expected list[str]"),
    ("policy fields a string", msgpack.packb(["k8s-object", 1, 0, "NetworkPolicy", "ns", "p", "u", "1", {}, "spec"]),
     "'fields': expected dict[str, Any], got str"),
    ("heartbeat components not dicts", msgpack.packb(["heartbeat", 1, 1, "s", "n", "i", "v", 1, 0.0, 0.0, "ok",
                                                       {"bus": "ok"}]), "'components': expected dict[str, dict"),
    ("heartbeat pid a bool", msgpack.packb(["heartbeat", 1, 1, "s", "n", "i", "v", True, 0.0, 0.0, "ok"]),
     "'pid': expected int, got bool"),
    ("not msgpack", b"abc", "malformed msgpack"),
]


@pytest.mark.parametrize("what, payload, reason", POISON, ids=[p[0] for p in POISON])
def test_poison_is_refused_at_decode_naming_the_field(what, payload, reason):
    with pytest.raises(codec.DecodeError, match=reason.replace("[", r"\[").replace("(", r"\(")):
        codec.decode(payload)


def test_well_typed_values_decode_and_floats_accept_ints():
    wm = codec.decode(msgpack.packb(["watermark", 1, 0, 42, 3]))  # an int time is a fine float
    assert isinstance(wm, Watermark) and wm.resource_version == 42
    rec = EndpointRecord("ns", "pod", "n1", ["10.0.0.1"], 7, ["k8s:app=x"], {"http": ["TCP", 80]})
    assert codec.decode(codec.encode(rec)) == rec


def _policy(name: str, spec: dict) -> K8sObject:
    return K8sObject(kind="NetworkPolicy", namespace="ns", name=name, uid="u", resource_version="1", fields=spec)


async def _next(watch, timeout: float = 5.0):
    return await asyncio.wait_for(watch.__anext__(), timeout)


async def test_watch_keeps_the_last_good_value_and_stays_alive(bus: Bus):
    kv = await bus.kv(subjects.K8S_BUCKET)
    key = "networkpolicies.ns.deny"
    good = _policy("deny", {"podSelector": {}})
    await kv.put(key, good)
    before = kv_mod.UNDECODABLE.total[subjects.K8S_BUCKET]
    events: list = []

    async def follow() -> None:
        async for ev in kv.watch(">"):
            events.append(ev)

    async def until(what: str, predicate) -> None:
        for _ in range(500):
            if predicate():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"not within 5 s: {what}; events {events}")

    task = asyncio.create_task(follow(), name="test-poison-follow")
    try:
        await until("initial values", lambda: events and events[-1].type is EventType.SYNCED)
        assert [(e.type, e.key, e.value) for e in events[:1]] == [(EventType.PUT, key, good)]
        for n, (_, payload, _) in enumerate(POISON, 1):  # every poison, raw, over the good value
            await kv.store.put(key, payload)
            # one at a time: a bucket keeps one revision per key, so a poison replaced before the watch read
            # it would never be seen (and rightly not counted)
            await until(f"poison {n} counted",
                        lambda: kv_mod.UNDECODABLE.total[subjects.K8S_BUCKET] - before >= n)  # noqa: B023 - awaited here
        later = _policy("later", {"podSelector": {"matchLabels": {"app": "x"}}})
        await kv.put("networkpolicies.ns.later", later)
        await until("the later policy", lambda: events[-1].key == "networkpolicies.ns.later")
        # the poison never reached the consumer: its last good value stands
        assert [(e.type, e.key) for e in events[2:]] == [(EventType.PUT, "networkpolicies.ns.later")]
        assert kv_mod.UNDECODABLE.total[subjects.K8S_BUCKET] - before == len(POISON)
        assert f"{subjects.K8S_BUCKET}/{key}" in kv_mod.UNDECODABLE.summary()
        healed = _policy("deny", {"podSelector": {}, "policyTypes": ["Ingress"]})
        await kv.put(key, healed)
        await until("the healed value", lambda: events[-1].key == key)
        assert events[-1].value == healed
        assert kv_mod.UNDECODABLE.summary() == ""
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_watch_starting_on_poison_skips_it_and_resyncs(bus: Bus):
    kv = await bus.kv(subjects.HEARTBEATS_BUCKET)
    await kv.store.put("datapath-writer.n1.bad", POISON[5][1])
    ok = Heartbeat(service="s", node="n1", instance="ok", version="v", pid=1, started_at=0.0, sent_at=0.0,
                   health="ok")
    await kv.put("s.n1.ok", ok)
    watch = kv.watch(">")
    assert (await _next(watch)).value == ok
    assert (await _next(watch)).type is EventType.SYNCED
    assert "datapath-writer.n1.bad" in kv_mod.UNDECODABLE.summary()
    assert set(await kv.items()) == {"s.n1.ok"}  # a snapshot leaves it out too
    await kv.delete("datapath-writer.n1.bad")  # never delivered, so no DELETE event; but healed
    await kv.put("s.n1.ok", ok)
    ev = await _next(watch)
    assert (ev.type, ev.key) == (EventType.PUT, "s.n1.ok")
    assert kv_mod.UNDECODABLE.summary() == ""
    await watch.aclose()


async def test_get_reads_poison_as_absent_and_create_repairs_it(bus: Bus):
    kv = await bus.kv(subjects.K8S_BUCKET)
    await kv.store.put(subjects.WATERMARK_KEY, msgpack.packb(["watermark", 1, 0, "abc", 0.0]))
    assert await kv.get(subjects.WATERMARK_KEY) is None
    good = Watermark(resource_version=12, time=1.0)
    await kv.create(subjects.WATERMARK_KEY, good)  # the owner's create replaces what nobody can read
    assert (await kv.get(subjects.WATERMARK_KEY)).value.resource_version == 12
    with pytest.raises(kv_mod.Conflict):  # a readable value is never overwritten by create
        await kv.create(subjects.WATERMARK_KEY, good)
