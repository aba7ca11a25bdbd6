"""A watch whose bucket is deleted and created anew re-syncs onto the new bucket (real nats-server).

Without it nats-py's ordered consumer resumes after the old stream's last sequence and never delivers
the owner's refill: the consumer stays wedged on its last state forever."""

from __future__ import annotations

import asyncio

import pytest

from propolis.bus import kv as kv_mod
from propolis.bus import subjects
from propolis.bus.kv import EventType
from propolis.bus.messages import Watermark


@pytest.mark.parametrize("keys", [">", ["pods.>", subjects.WATERMARK_KEY]], ids=["whole-bucket", "filters"])
async def test_watch_follows_a_recreated_bucket(bus, monkeypatch, keys):
    monkeypatch.setattr(kv_mod, "STREAM_CHECK_INTERVAL_S", 0.1)
    bucket = subjects.K8S_BUCKET
    kv = await bus.kv(bucket)
    for i in range(5):  # move the old stream's sequence well past what the refill will reach
        await kv.put(subjects.WATERMARK_KEY, Watermark(i + 1, 0.0))
    events: list = []
    synced = asyncio.Event()

    async def follow() -> None:
        async for ev in kv.watch(keys):
            events.append(ev)
            if ev.type is EventType.SYNCED:
                synced.set()

    task = asyncio.create_task(follow(), name="test-follow")
    try:
        await asyncio.wait_for(synced.wait(), 5)
        await bus.js.delete_key_value(bucket)
        await bus.ensure_buckets()
        kv2 = await bus.kv(bucket)
        await kv2.put("pods.ns.a", Watermark(42, 0.0))

        async def refill_seen() -> None:
            while not any(e.type is EventType.PUT and e.key == "pods.ns.a" for e in events):
                await asyncio.sleep(0.05)

        await asyncio.wait_for(refill_seen(), 5 + kv_mod.WATCH_RESYNC_JITTER_S)  # a re-sync starts after its jitter
        # the old watermark is gone from the new bucket: the consumer is told so
        assert any(e.type is EventType.DELETE and e.key == subjects.WATERMARK_KEY for e in events)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
