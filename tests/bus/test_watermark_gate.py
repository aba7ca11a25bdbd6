"""Losing a bucket's contents is not deleting them: consumers act only on what the owner's watermark
covers, and after the watermark vanished only on a new epoch's (bus/watermark.py, writer/inputs.py).

The last test drives the datapath-writer's inputs through a real nats-server while the k8s bucket is
purged key by key (watermark last) and as a whole stream."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from propolis.bus import subjects
from propolis.bus.kv import EventType, KvEvent
from propolis.bus.messages import K8sObject, Watermark
from propolis.bus.watermark import WatermarkGate
from propolis.writer.inputs import ClusterInputs

SYNCED = KvEvent(EventType.SYNCED)
POLICY = "ciliumnetworkpolicies.prod.deny-other"


def obj(name: str, kind: str = "CiliumNetworkPolicy") -> K8sObject:
    return K8sObject(kind, "prod", name, f"uid-{name}", "1", {}, {"endpointSelector": {}})


def put(key: str, value: Any) -> KvEvent:
    return KvEvent(EventType.PUT, key, value, 1)


def delete(key: str) -> KvEvent:
    return KvEvent(EventType.DELETE, key)


def mark(rv: int, epoch: str = "e1") -> KvEvent:
    return put(subjects.WATERMARK_KEY, Watermark(rv, 0.0, epoch))


def feed(gate: WatermarkGate, *events: KvEvent) -> list[KvEvent] | None:
    out = None
    for ev in events:
        released = gate.feed(ev)
        if released is not None:
            out = (out or []) + released
    return out


def test_changes_wait_for_the_watermark_that_covers_them():
    gate = WatermarkGate("B")
    assert feed(gate, put("a", 1), put("b", 2), SYNCED) is None
    assert not gate.ready  # no watermark yet: an owner that never ran, or a wiped bucket
    assert [e.key for e in feed(gate, mark(5))] == ["a", "b"]
    assert gate.ready and gate.resource_version == 5
    assert feed(gate, put("c", 3)) is None and "c" not in gate.released


def test_a_normal_delete_by_the_owner_goes_through():
    gate = WatermarkGate("B")
    feed(gate, put("a", 1), put("b", 2), mark(5), SYNCED)
    released = feed(gate, delete("a"), mark(6))
    assert [(e.type, e.key) for e in released] == [(EventType.DELETE, "a")]
    assert gate.released == {"b": 2} and gate.ready


def test_purge_with_the_watermark_last_never_prunes():
    gate = WatermarkGate("B")
    feed(gate, put("a", 1), put("b", 2), mark(5), SYNCED)
    assert feed(gate, delete("a"), delete("b"), delete(subjects.WATERMARK_KEY)) is None
    assert gate.lost and not gate.ready and gate.released == {"a": 1, "b": 2}
    # the owner did not notice yet: one write and a watermark of the old epoch do not release the purge
    assert feed(gate, put("c", 3), mark(6)) is None
    assert gate.released == {"a": 1, "b": 2}
    # the owner's refill under a new epoch: diffed against what was released (only c is new)
    released = feed(gate, put("a", 1), put("b", 2), mark(6, epoch="e2"))
    assert [(e.type, e.key) for e in released] == [(EventType.PUT, "c")]
    assert gate.ready and gate.resyncs == 1 and gate.released == {"a": 1, "b": 2, "c": 3}


def test_refill_under_a_new_epoch_deletes_what_the_owner_no_longer_has():
    gate = WatermarkGate("B")
    feed(gate, put("a", 1), put("b", 2), mark(5), SYNCED)
    feed(gate, delete("a"), delete(subjects.WATERMARK_KEY), delete("b"))
    released = feed(gate, put("b", 2), mark(7, epoch="e2"))
    assert [(e.type, e.key) for e in released] == [(EventType.DELETE, "a")]


def test_a_value_that_is_not_a_watermark_is_ignored():
    gate = WatermarkGate("B")
    feed(gate, put("a", 1), mark(5), SYNCED)
    assert feed(gate, put(subjects.WATERMARK_KEY, "abc")) is None
    assert gate.ready and gate.resource_version == 5


async def eventually(check: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_writer_inputs_keep_their_state_while_the_k8s_bucket_is_purged(bus):
    k8s, ids = await bus.kv(subjects.K8S_BUCKET), await bus.kv(subjects.IDENTITIES_BUCKET)
    for name in ("deny-other", "allow-client"):
        await k8s.put(f"ciliumnetworkpolicies.prod.{name}", obj(name))
    await k8s.put(subjects.WATERMARK_KEY, Watermark(10, 0.0, "e1"))
    await ids.put(subjects.WATERMARK_KEY, Watermark(10, 0.0, "i1"))
    inputs = ClusterInputs()
    follow = asyncio.create_task(inputs.follow(k8s, ids, node="n1"))
    seen: list[tuple[bool, int]] = []  # (synced, policies) after every change the writer would act on

    async def record() -> None:
        while True:
            await inputs.changed.wait()
            inputs.changed.clear()
            seen.append((inputs.synced, len(inputs.policies)))

    recorder = asyncio.create_task(record())
    try:
        await eventually(lambda: inputs.synced and len(inputs.policies) == 2, "initial sync")
        # purge key by key, the watermark last (what `nats kv purge` per key does)
        for key in (f"ciliumnetworkpolicies.prod.{n}" for n in ("deny-other", "allow-client")):
            await k8s.store.purge(key)
        await k8s.store.purge(subjects.WATERMARK_KEY)
        await eventually(lambda: inputs.k8s_gate.lost, "the gate noticed the lost watermark")
        # an unrelated change by an owner that has not noticed yet: same epoch, must not release the purge
        await k8s.put("namespaces._.other", obj("other", "Namespace"))
        await k8s.put(subjects.WATERMARK_KEY, Watermark(11, 0.0, "e1"))
        await asyncio.sleep(0.2)
        assert not inputs.synced and len(inputs.policies) == 2
        # the owner refills under a new epoch, one policy really gone meanwhile: that one delete goes through
        await k8s.put(POLICY, obj("deny-other"))
        await k8s.put(subjects.WATERMARK_KEY, Watermark(12, 0.0, "e2"))
        await eventually(lambda: inputs.synced, "re-synced under the new epoch")
        assert set(inputs.policies) == {POLICY} and "other" in inputs.namespaces
        # a whole-stream purge: the writer never sees fewer policies while the owner refills
        await bus.js.purge_stream(f"KV_{subjects.K8S_BUCKET}")
        await k8s.put(POLICY, obj("deny-other"))
        await k8s.put(subjects.WATERMARK_KEY, Watermark(13, 0.0, "e3"))
        await eventually(lambda: inputs.k8s_watermark == 13, "watermark after the stream purge")
        assert inputs.synced and set(inputs.policies) == {POLICY}
        # throughout: whenever the writer could act (synced), no policy it enforces had been dropped
        enforced_while_synced = [n for synced, n in seen if synced]
        assert enforced_while_synced and min(enforced_while_synced) >= 1, seen
        assert not any(synced and n == 0 for synced, n in seen)
        # and an owner's normal delete still deletes
        await k8s.delete(POLICY)
        await k8s.put(subjects.WATERMARK_KEY, Watermark(14, 0.0, "e3"))
        await eventually(lambda: not inputs.policies, "a normal delete goes through")
    finally:
        for task in (follow, recorder):
            task.cancel()
        await asyncio.gather(follow, recorder, return_exceptions=True)


def purged(key: str) -> KvEvent:
    return KvEvent(EventType.DELETE, key, None, 0, purged=True)


def test_a_purged_key_is_held_even_when_a_watermark_of_the_same_epoch_follows():
    gate = WatermarkGate("B")
    feed(gate, put("a", 1), put("b", 2), mark(5), SYNCED)
    # the purge reached a, then the owner wrote c and its watermark before the purge reached the watermark
    assert [e.key for e in feed(gate, purged("a"), put("c", 3), mark(6))] == ["c"]
    assert gate.released == {"a": 1, "b": 2, "c": 3} and gate.ready
    # the owner rewrites a (its repair): nothing changes; a later watermark of a new epoch releases no delete
    assert feed(gate, put("a", 1), mark(7)) == []
    # purged and not rewritten by the owner's refill under a new epoch: gone
    released = feed(gate, purged("b"), mark(8, epoch="e2"))
    assert [(e.type, e.key) for e in released] == [(EventType.DELETE, "b")]
