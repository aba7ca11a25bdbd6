"""The reconciler's periodic refresh repairs drift through the target's `refresh` (a diff against the
actual object, not a cache), prunes what nobody desires once synced, and leaves a failed key alone;
and the conntrack GC interval adapts like Cilium's."""

from __future__ import annotations

import asyncio

from propolis.errors import ValidationError
from propolis.reconcile import Reconciler, Status
from propolis.writer.ct_gc import GC_MIN_INTERVAL, next_interval


class CachingTarget:
    """Like the policy map target: `update` diffs against what it last wrote (a cache), so only
    `refresh`, which reads the actual rows, can see a row deleted behind its back."""

    def __init__(self):
        self.actual: dict[str, set[int]] = {}
        self.written: dict[str, set[int]] = {}
        self.calls: list[tuple[str, str]] = []
        self.refuse: set[str] = set()

    def _apply(self, key, rows, known):
        if key in self.refuse:
            raise ValidationError("entries", f"{key} does not fit")
        have = self.actual.setdefault(key, set())
        have |= rows - known
        have -= known - rows
        self.written[key] = set(rows)

    async def update(self, key, desired):
        self.calls.append(("update", key))
        self._apply(key, desired, self.written.get(key, set()))

    async def refresh(self, key, desired):
        self.calls.append(("refresh", key))
        self._apply(key, desired, set(self.actual.get(key, set())))

    async def delete(self, key):
        self.calls.append(("delete", key))
        self.actual.pop(key, None)

    async def list_actual(self):
        return list(self.actual)


async def wait_for(predicate, timeout=3.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)



async def test_refresh_restores_a_row_deleted_behind_the_writers_back(running):
    target = CachingTarget()
    rec = running(Reconciler("policy", target, refresh_interval=0.2))
    await rec.wait_until_reconciled(rec.upsert("ep1", {1, 2, 3}))
    rec.mark_synced()
    target.actual["ep1"].discard(2)  # bpftool map delete
    await rec.wait_until_reconciled(rec.upsert("ep1", {1, 2, 3}))  # unchanged: no write, no repair
    assert target.actual["ep1"] == {1, 3}
    await wait_for(lambda: target.actual["ep1"] == {1, 2, 3})
    assert ("refresh", "ep1") in target.calls
    assert rec.status["ep1"].status is Status.DONE


async def test_refresh_prunes_orphans_once_synced_and_changes_still_use_update(running):
    target = CachingTarget()
    target.actual["gone"] = {9}
    rec = running(Reconciler("policy", target, refresh_interval=0.2))
    await rec.wait_until_reconciled(rec.upsert("ep1", {1}))
    await asyncio.sleep(0.3)
    assert "gone" in target.actual, "pruned before every input was synced"
    rec.mark_synced()
    await wait_for(lambda: "gone" not in target.actual)
    target.calls.clear()
    await rec.wait_until_reconciled(rec.upsert("ep1", {1, 4}))
    assert target.calls[0] == ("update", "ep1")


async def test_refresh_leaves_a_permanently_failed_key_until_it_changes(running):
    target = CachingTarget()
    target.refuse.add("big")
    rec = running(Reconciler("policy", target, refresh_interval=0.1))
    failed = await rec.wait_until_reconciled(rec.upsert("big", set(range(10))))
    assert "does not fit" in failed["big"]
    await asyncio.sleep(0.35)
    assert target.calls.count(("update", "big")) == 1 and ("refresh", "big") not in target.calls
    target.refuse.clear()
    assert not await rec.wait_until_reconciled(rec.upsert("big", {1}))


def test_ct_gc_interval_adapts_to_how_much_a_pass_freed():
    assert next_interval(300, 0.0) == 300             # nothing learned
    assert next_interval(300, 0.5) == 150             # half a table expired: twice as often
    assert next_interval(300, 0.95) == 30             # capped at a 90 % ratio: 10x as often
    assert next_interval(15, 0.9) == GC_MIN_INTERVAL  # never under 10 s
    assert next_interval(300, 0.01) == 450            # little to do: 1.5x longer
    assert next_interval(40000, 0.01, maximum=43200) == 43200
    assert next_interval(300, 0.1) == 300             # in between: keep


def test_one_back_off_for_every_loop():
    from propolis.reconcile import backoff_delay
    assert [backoff_delay(n) for n in (1, 2, 3)] == [0.1, 0.2, 0.4]
    assert backoff_delay(30) == 60.0 and backoff_delay(30, maximum=5.0) == 5.0
