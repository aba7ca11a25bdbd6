"""A watch on a key subset that holds nothing, in a bucket that holds other keys, is SYNCED at once (real
nats-server).

The server reports such a consumer's position as the stream's last sequence although it delivered nothing;
waiting for that sequence to "arrive" held SYNCED back for the whole catch-up timeout (5 s) on every
per-node or per-kind watch of an empty subset."""

from __future__ import annotations

import logging

from propolis.bus import kv as kv_mod
from propolis.bus import subjects
from propolis.bus.kv import EventType
from propolis.bus.messages import Watermark


async def test_watch_of_an_empty_subset_is_synced_without_waiting_out_the_catch_up(bus, monkeypatch, caplog):
    monkeypatch.setattr(kv_mod, "INITIAL_CATCH_UP_S", 60.0)  # the bug would now hold the test for a minute
    kv = await bus.kv(subjects.K8S_BUCKET)
    for i in range(20):
        await kv.put(f"pods.ns.p{i}", Watermark(i + 1, 0.0))
    caplog.set_level(logging.WARNING, logger=kv_mod.__name__)
    events = []
    async for ev in kv.watch("services.>"):
        events.append(ev)
        if ev.type is EventType.SYNCED:
            break
    assert [ev.type for ev in events] == [EventType.SYNCED]
    assert not [r for r in caplog.records if "never arrived" in r.getMessage()]
