"""Pruning in the reconciler: it follows `mark_synced` even when that came while a pass ran and no
periodic refresh is scheduled, deletes go before updates, and a failing `list_actual` backs off
instead of spinning."""

from __future__ import annotations

import asyncio

from propolis.errors import TemporaryError
from propolis.reconcile import Reconciler


class Rows:
    def __init__(self, actual):
        self.actual = dict(actual)
        self.calls: list[tuple[str, str]] = []
        self.list_times: list[float] = []
        self.list_error: Exception | None = None
        self.in_update = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()

    async def update(self, key, desired):
        self.calls.append(("update", key))
        self.in_update.set()
        await self.release.wait()
        self.actual[key] = desired

    async def delete(self, key):
        self.calls.append(("delete", key))
        self.actual.pop(key, None)

    async def list_actual(self):
        self.list_times.append(asyncio.get_running_loop().time())
        if self.list_error is not None:
            raise self.list_error
        return list(self.actual)


async def wait_for(predicate, timeout=3.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_mark_synced_during_a_pass_prunes_without_a_refresh(running):
    target = Rows({"stale": 1})
    rec = running(Reconciler("rows", target, refresh_interval=float("inf")))
    target.release.clear()
    rec.upsert("a", 1)
    await target.in_update.wait()  # the pass is inside update("a") ...
    rec.mark_synced()  # ... when the inputs report synced
    target.release.set()
    await wait_for(lambda: "stale" not in target.actual)
    assert rec.idle() and target.actual == {"a": 1}


async def test_deletes_go_before_updates():
    target = Rows({})
    rec = Reconciler("rows", target, refresh_interval=float("inf"))
    rec.upsert("old", 1)
    await rec.reconcile_once()
    target.calls.clear()
    rec.upsert("new", 2)
    rec.remove("old")  # changed last, applied first
    await rec.reconcile_once()
    assert target.calls == [("delete", "old"), ("update", "new")]


async def test_failing_list_actual_backs_off_and_prunes_once_it_answers(running):
    target = Rows({"stale": 1})
    target.list_error = TemporaryError("NATS away")
    rec = running(Reconciler("rows", target, refresh_interval=float("inf"), backoff_min=0.05, backoff_max=1.0))
    rec.mark_synced()
    await wait_for(lambda: len(target.list_times) >= 4)
    gaps = [b - a for a, b in zip(target.list_times, target.list_times[1:])]
    assert all(gap >= 0.05 * 2 ** i * 0.9 for i, gap in enumerate(gaps[:3])), f"not backing off: {gaps}"
    assert not rec.idle() and "stale" in target.actual
    target.list_error = None
    await wait_for(lambda: "stale" not in target.actual)
    assert rec.idle()
