"""The generic reconciler against an in-memory target whose failures we control."""

from __future__ import annotations

import asyncio

from propolis.errors import ValidationError
from propolis.reconcile import Reconciler, Status


class DictTarget:
    def __init__(self, actual=None):
        self.actual = dict(actual or {})
        self.fail: set = set()
        self.calls: list = []

    async def update(self, key, desired):
        self.calls.append(("update", key))
        if key in self.fail:
            raise OSError(f"cannot write {key}")
        self.actual[key] = desired

    async def delete(self, key):
        self.calls.append(("delete", key))
        if key in self.fail:
            raise OSError(f"cannot delete {key}")
        self.actual.pop(key, None)

    async def list_actual(self):
        return list(self.actual)



async def test_applies_desired_state_and_reports_revision(running):
    target = DictTarget()
    rec = running(Reconciler("t", target))
    rec.upsert("a", 1)
    rev = rec.upsert("b", 2)
    await rec.wait_until_reconciled(rev)
    assert target.actual == {"a": 1, "b": 2}
    assert rec.status["a"].status is Status.DONE


async def test_unchanged_upsert_writes_nothing(running):
    target = DictTarget()
    rec = running(Reconciler("t", target))
    await rec.wait_until_reconciled(rec.upsert("a", 1))
    rec.upsert("a", 1)
    await asyncio.sleep(0.05)
    assert target.calls == [("update", "a")]


async def test_no_prune_before_sync_then_prune(running):
    target = DictTarget({"live": 1, "stale": 2})
    rec = running(Reconciler("t", target))
    await rec.wait_until_reconciled(rec.upsert("live", 1))
    await asyncio.sleep(0.05)
    assert "stale" in target.actual  # inputs not synced: nothing is deleted
    rec.mark_synced()
    for _ in range(100):
        if "stale" not in target.actual:
            break
        await asyncio.sleep(0.01)
    assert target.actual == {"live": 1}


async def test_failures_back_off_degrade_health_and_heal(running):
    target = DictTarget()
    target.fail.add("bad")
    rec = running(Reconciler("t", target, backoff_min=0.01, backoff_max=0.05))
    rec.upsert("good", 1)
    rec.upsert("bad", 2)
    rec.mark_synced()
    for _ in range(100):
        if rec.status["bad"].attempts >= 2:
            break
        await asyncio.sleep(0.01)
    assert target.actual == {"good": 1}
    assert "1 errors" in rec.health().reason and rec.health().state.name == "DEGRADED"
    # every change was attempted: a waiter learns which keys failed instead of waiting forever
    assert await rec.wait_until_reconciled(timeout=1) == {"bad": "cannot write bad"}
    target.fail.clear()
    for _ in range(100):  # the back-off retries it
        if rec.health().state.name == "OK":
            break
        await asyncio.sleep(0.01)
    assert target.actual == {"good": 1, "bad": 2} and rec.health().state.name == "OK"


class MapFull(DictTarget):
    """A target refusing values over a size, like a policy map with more rows than it holds."""

    async def update(self, key, desired):
        self.calls.append(("update", key))
        if desired > 100:
            raise ValidationError("entries", f"{desired} rows exceed the policy map size 100")
        self.actual[key] = desired


async def test_permanent_error_fails_the_key_until_it_changes_and_never_blocks_others(running):
    target = MapFull({"big": 5})
    rec = running(Reconciler("endpoint-policy", target, backoff_min=0.01, refresh_interval=0.05))
    rec.mark_synced()
    rev = rec.upsert("big", 170)
    rec.upsert("small", 7)
    failed = await rec.wait_until_reconciled(rev, timeout=2)
    assert failed == {"big": "entries: 170 rows exceed the policy map size 100"}
    assert target.actual == {"big": 5, "small": 7}  # the failed key keeps what it had: never more open
    assert rec.status["big"].status is Status.FAILED
    assert "1 failed (e.g. big: entries: 170 rows" in rec.health().reason
    await asyncio.sleep(0.2)  # several refresh intervals: a failed key is not retried
    assert target.calls.count(("update", "big")) == 1
    rec.upsert("big", 170)  # the same value again: still not retried
    later = rec.upsert("other", 1)
    assert await rec.wait_until_reconciled(later, timeout=2) == {"big": failed["big"]}
    assert target.calls.count(("update", "big")) == 1
    await rec.wait_until_reconciled(rec.upsert("big", 90), timeout=2)  # a change is tried at once
    assert target.actual["big"] == 90 and rec.health().state.name == "OK"


async def test_remove_and_replace_all(running):
    target = DictTarget()
    rec = running(Reconciler("t", target))
    rec.replace_all({"a": 1, "b": 2, "c": 3})
    await rec.wait_until_reconciled()
    rec.replace_all({"b": 20, "d": 4})
    await rec.wait_until_reconciled()
    assert target.actual == {"b": 20, "d": 4}


async def test_refresh_repairs_drift(running):
    target = DictTarget()
    rec = running(Reconciler("t", target, refresh_interval=0.05))
    rec.mark_synced()
    await rec.wait_until_reconciled(rec.upsert("a", 1))
    target.actual["a"] = "tampered"
    target.actual["intruder"] = 9
    for _ in range(100):
        if target.actual == {"a": 1}:
            break
        await asyncio.sleep(0.01)
    assert target.actual == {"a": 1}
