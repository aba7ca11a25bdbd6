"""A lease given up on shutdown is taken at once: by a restarted instance, and by a running standby
without waiting for its next poll (bus/lease.py), against a real nats-server."""

from __future__ import annotations

import asyncio
import time

from propolis.bus import subjects
from propolis.bus.lease import LeaseElector

KEY = subjects.K8S_WATCHER_LEASE_KEY


async def test_released_lease_is_taken_by_the_standby_well_under_a_second(bus):
    kv = await bus.kv(subjects.K8S_BUCKET)
    holder = LeaseElector(kv, KEY, "node-a/1", duration=9.0)
    standby = LeaseElector(kv, KEY, "node-b/2", duration=9.0)
    assert await holder.try_acquire()
    run = asyncio.create_task(standby.run())
    try:
        await asyncio.sleep(0.3)  # the standby polled once and waits (3 s until its next poll)
        assert not standby.is_leader
        await holder.release()
        released_at = time.monotonic()
        while not standby.is_leader:
            assert time.monotonic() - released_at < 0.5, "standby did not take the released lease within 0.5 s"
            await asyncio.sleep(0.01)
        assert (await kv.get(KEY)).value.holder == "node-b/2"
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


async def test_a_restarted_instance_takes_a_released_lease_at_once(bus):
    kv = await bus.kv(subjects.K8S_BUCKET)
    old = LeaseElector(kv, KEY, "node-a/1", duration=9.0)
    assert await old.try_acquire()
    assert not await LeaseElector(kv, KEY, "node-a/2", duration=9.0).try_acquire()  # held: not before expiry
    await old.release()
    assert await LeaseElector(kv, KEY, "node-a/3", duration=9.0).try_acquire()


async def test_a_foreign_message_at_the_lease_key_is_taken_over_not_a_crash(bus):
    """A valid message of another schema where the lease belongs (a bad write, an old version) must not
    kill the lease task on every restart: the elector repairs the key."""
    from propolis.bus.messages import Watermark

    kv = await bus.kv(subjects.K8S_BUCKET)
    await kv.put(KEY, Watermark(7, 0.0))
    elector = LeaseElector(kv, KEY, "node-a/1", duration=9.0)
    assert await elector.try_acquire()
    assert (await kv.get(KEY)).value.holder == "node-a/1"
