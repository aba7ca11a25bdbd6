"""A KV watch on several key filters (real nats-server): one consumer, only the keys under the filters, the
initial values then SYNCED (at once for an empty subset), and overlapping filters refused before the server
sees them."""

from __future__ import annotations

import asyncio

import pytest

from propolis.bus import kv as kv_mod
from propolis.bus import subjects
from propolis.bus.connection import Bus
from propolis.bus.kv import EventType, KvEvent
from propolis.bus.messages import Watermark
from propolis.errors import ValidationError

FILTERS = [subjects.node_pods_keys("w1"), subjects.k8s_keys("services"), subjects.WATERMARK_KEY]


@pytest.fixture(autouse=True)
def no_start_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_mod, "WATCH_START_JITTER_S", 0.0)


async def _until_synced(watch: object) -> list[KvEvent]:
    events: list[KvEvent] = []
    async for ev in watch:  # type: ignore[attr-defined]
        events.append(ev)
        if ev.type is EventType.SYNCED:
            return events
    raise AssertionError("the watch ended before SYNCED")


async def test_a_watch_on_several_filters_gets_only_their_keys_through_one_consumer(bus: Bus) -> None:
    kv = await bus.kv(subjects.K8S_BUCKET)
    wanted = {subjects.k8s_key("pods", "prod", "web", node="w1"), subjects.k8s_key("services", "prod", "web"),
              subjects.WATERMARK_KEY}
    others = {subjects.k8s_key("pods", "prod", "api", node="w2"), subjects.k8s_key("namespaces", None, "prod"),
              subjects.K8S_WATCHER_LEASE_KEY}
    for n, key in enumerate(sorted(wanted | others)):
        await kv.put(key, Watermark(n + 1, 0.0))
    consumers = (await bus.jetstream_info()).consumers
    watch = kv.watch(FILTERS)
    try:
        initial = await _until_synced(watch)
        assert {e.key for e in initial if e.type is EventType.PUT} == wanted
        assert (await bus.jetstream_info()).consumers == consumers + 1
        for key in sorted(others):  # updates outside the filters never arrive; one inside does
            await kv.put(key, Watermark(100, 0.0))
        await kv.delete(subjects.k8s_key("pods", "prod", "web", node="w1"))
        await kv.put(subjects.k8s_key("services", "prod", "db"), Watermark(101, 0.0))
        updates = [await asyncio.wait_for(anext(watch), 5) for _ in range(2)]
        assert [(e.type, e.key) for e in updates] == [
            (EventType.DELETE, subjects.k8s_key("pods", "prod", "web", node="w1")),
            (EventType.PUT, subjects.k8s_key("services", "prod", "db"))]
    finally:
        await watch.aclose()
    assert await kv.items(FILTERS) == {k: e for k, e in (await kv.items()).items()
                                       if k in wanted - {subjects.k8s_key("pods", "prod", "web", node="w1")}
                                       or k == subjects.k8s_key("services", "prod", "db")}


async def test_several_filters_over_an_empty_subset_are_synced_at_once(bus: Bus,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_mod, "INITIAL_CATCH_UP_S", 60.0)  # waiting for a position would hold the test
    kv = await bus.kv(subjects.K8S_BUCKET)
    for i in range(10):
        await kv.put(subjects.k8s_key("pods", "ns", f"p{i}", node="w2"), Watermark(i + 1, 0.0))
    events = await asyncio.wait_for(_until_synced(kv.watch(FILTERS)), 5)
    assert [e.type for e in events] == [EventType.SYNCED]


@pytest.mark.parametrize("filters", [["pods.>", subjects.node_pods_keys("w1")], [">", "services.>"],
                                     ["pods.*.prod.>", "pods.w1.>"], []])
async def test_overlapping_or_no_filters_are_refused(bus: Bus, filters: list[str]) -> None:
    kv = await bus.kv(subjects.K8S_BUCKET)
    with pytest.raises(ValidationError):
        await anext(kv.watch(filters))
    with pytest.raises(ValidationError):
        await kv.items(filters)


def test_filters_overlap_token_by_token() -> None:
    assert subjects.filters_overlap("pods.*.prod.>", "pods.w1.>")
    assert subjects.filters_overlap("a.b", "a.*")
    assert not subjects.filters_overlap("pods.w1.>", "pods.w2.>")
    assert not subjects.filters_overlap("a.b", "a.b.c")
    assert not subjects.filters_overlap(subjects.WATERMARK_KEY, "namespaces.>")
