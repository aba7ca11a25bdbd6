"""The identity-allocator's reconcilers against a real nats-server (`identity/sync.py`).

The k8s bucket is written here as the k8s-watcher writes it (objects, then its watermark): records
follow pods once a watermark covers them, the k8s watermark is passed on behind them, a record of a
pod gone while no allocator ran is pruned only once the k8s bucket is covered, a purged identities
bucket is repaired by the GC holder with the same numbers under a new epoch (watermark last), and an
unused identity is released by the holder only, after the grace period.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from propolis.bus import subjects
from propolis.bus.messages import EndpointRecord, IdentityRecord, Watermark
from propolis.bus.watermark import new_epoch
from propolis.identity.allocator import IdentityAllocator
from propolis.identity.sync import IdentitySync
from propolis.k8s.kinds import KINDS


def pod(name: str, app: str, rv: int) -> Any:
    return KINDS["pods"].to_record({"metadata": {"name": name, "namespace": "prod", "uid": f"uid-{name}",
                                                 "resourceVersion": str(rv), "labels": {"app": app}},
                                    "spec": {"nodeName": "n1"}, "status": {"podIP": "10.244.1.9"}})


class K8sBucket:
    """Writes PROPOLIS_K8S_V1 the way its owner does: objects first, then a watermark behind them."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv
        self.rv = 0
        self.epoch = new_epoch()

    async def put(self, *objects: Any) -> None:
        for obj in objects:
            self.rv += 1
            await self.kv.put(subjects.k8s_key(KINDS[obj.kind.lower() + "s"].plural, obj.namespace or None,
                                               obj.name, node=obj.fields.get("nodeName", "")), obj)
        await self.kv.put(subjects.WATERMARK_KEY, Watermark(self.rv, time.time(), self.epoch))

    async def delete(self, key: str) -> None:
        self.rv += 1
        await self.kv.delete(key)
        await self.kv.put(subjects.WATERMARK_KEY, Watermark(self.rv, time.time(), self.epoch))


NAMESPACE = KINDS["namespaces"].to_record({"metadata": {"name": "prod", "uid": "uid-prod", "resourceVersion": "1"}})


@pytest.fixture
async def buckets(bus):
    return await bus.kv(subjects.K8S_BUCKET), await bus.kv(subjects.IDENTITIES_BUCKET)


@pytest.fixture
async def start_allocator(buckets):
    """``start_allocator(holder=…)`` runs an IdentitySync with every task the service spawns."""
    k8s_kv, ids_kv = buckets
    tasks: list[asyncio.Task[Any]] = []

    async def start(holder: dict[str, bool], **kwargs: float) -> IdentitySync:
        sync = IdentitySync(ids_kv, IdentityAllocator(ids_kv), cluster="test", is_holder=lambda: holder["v"],
                            **{"gc_grace": 60.0, "gc_interval": 0.1, "repair_interval": 60.0,
                               "probe_interval": 0.1, **kwargs})
        await sync.load()
        for coro in (sync.follow_k8s(k8s_kv), sync.follow_identities(), sync.endpoints.run(), sync.gc.run(),
                     sync.run()):
            tasks.append(asyncio.create_task(coro))
        return sync

    yield start
    for t in tasks:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert not [r for r in results if not isinstance(r, asyncio.CancelledError)], results


async def eventually(check: Any, timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def passed_on(ids_kv: Any, sync: IdentitySync, rv: int) -> bool:
    """Our watermark covers `rv`, carries our current epoch and follows every record and identity."""
    entries = await ids_kv.items()
    mark = entries.get(subjects.WATERMARK_KEY)
    others = [e.revision for k, e in entries.items() if k.startswith(("endpoints.", "id.", "labels."))]
    return (mark is not None and mark.value.resource_version >= rv and mark.value.epoch == sync.epoch
            and mark.revision > max(others, default=0))


async def test_records_follow_covered_pods_and_the_watermark_is_passed_on_behind_them(buckets, start_allocator):
    k8s_kv, ids_kv = buckets
    k8s = K8sBucket(k8s_kv)
    await ids_kv.put("endpoints.prod.gone", EndpointRecord("prod", "gone", "n1", [], 4242, ["k8s:app=gone"]))
    # objects without a watermark behind them: nothing is acted on, nothing pruned
    await k8s_kv.put("namespaces._.prod", NAMESPACE)
    await k8s_kv.put("pods.n1.prod.web-1", pod("web-1", "web", 2))
    sync = await start_allocator({"v": True})
    await asyncio.sleep(0.3)
    assert await ids_kv.get("endpoints.prod.web-1") is None and await ids_kv.get("endpoints.prod.gone") is not None

    await k8s.put(pod("web-2", "web", 3))
    await eventually(lambda: passed_on(ids_kv, sync, k8s.rv), what="watermark passed on")
    web1, web2 = (await ids_kv.get("endpoints.prod.web-1")).value, (await ids_kv.get("endpoints.prod.web-2")).value
    assert web1.identity == web2.identity and "k8s:app=web" in web1.labels
    assert await ids_kv.get("endpoints.prod.gone") is None, "a record of a pod gone meanwhile was kept"
    assert isinstance((await ids_kv.get(f"id.{web1.identity}")).value, IdentityRecord)

    await k8s.delete("pods.n1.prod.web-2")
    await eventually(lambda: passed_on(ids_kv, sync, k8s.rv), what="delete's watermark passed on")
    assert await ids_kv.get("endpoints.prod.web-2") is None and sync.repairs == 0


async def test_purged_identities_bucket_is_repaired_with_the_same_numbers(bus, buckets, start_allocator):
    k8s_kv, ids_kv = buckets
    k8s = K8sBucket(k8s_kv)
    await k8s.put(NAMESPACE, pod("web-1", "web", 2), pod("api-1", "api", 3))
    sync = await start_allocator({"v": True})
    await eventually(lambda: passed_on(ids_kv, sync, k8s.rv), what="first watermark")
    before = {k: e.value for k, e in (await ids_kv.items("endpoints.>")).items()}
    epoch = sync.epoch

    await bus.js.purge_stream(f"KV_{subjects.IDENTITIES_BUCKET}")
    await eventually(lambda: passed_on(ids_kv, sync, k8s.rv), what="repaired, watermark last")
    assert {k: e.value for k, e in (await ids_kv.items("endpoints.>")).items()} == before
    for record in before.values():
        assert (await ids_kv.get(f"id.{record.identity}")).value.labels == record.labels
    assert (await ids_kv.get("id.2")).value.reserved, "reserved identities re-created"
    assert sync.epoch != epoch and sync.repairs == 1


async def test_unused_identity_is_released_by_the_holder_after_the_grace(buckets, start_allocator):
    k8s_kv, ids_kv = buckets
    k8s = K8sBucket(k8s_kv)
    await k8s.put(NAMESPACE, pod("web-1", "web", 2))
    holder = {"v": False}
    sync = await start_allocator(holder, gc_grace=0.5)
    await eventually(lambda: passed_on(ids_kv, sync, k8s.rv), what="first watermark")
    old = (await ids_kv.get("endpoints.prod.web-1")).value.identity

    await k8s.put(pod("web-1", "web2", 4))  # relabelled: a new identity, the old one unused
    await eventually(lambda: _identity_changed(ids_kv, old), what="relabel")
    await asyncio.sleep(1.0)  # twice the grace: not the holder, so nothing is collected
    assert await ids_kv.get(f"id.{old}") is not None

    holder["v"] = True
    await eventually(lambda: _gone(ids_kv, f"id.{old}"), what="collected by the holder")
    new = (await ids_kv.get("endpoints.prod.web-1")).value.identity
    assert await ids_kv.get(f"id.{new}") is not None and sync.gc_target.collected == 1


async def _identity_changed(ids_kv: Any, old: int) -> bool:
    entry = await ids_kv.get("endpoints.prod.web-1")
    return entry is not None and entry.value.identity != old


async def _gone(ids_kv: Any, key: str) -> bool:
    return await ids_kv.get(key) is None


async def test_a_new_epoch_rewrites_every_record_not_only_the_missing_ones(buckets, start_allocator):
    """Consumers take a purged key the owner did not rewrite under a new epoch as gone; a repair's snapshot
    may predate a purge still running, so everything kept is written again, the watermark last."""
    k8s_kv, ids_kv = buckets
    k8s = K8sBucket(k8s_kv)
    await k8s.put(NAMESPACE, pod("web-1", "web", 2), pod("api-1", "api", 3))
    sync = await start_allocator({"v": True})
    await eventually(lambda: passed_on(ids_kv, sync, k8s.rv), what="first watermark")
    epoch = sync.epoch
    mark = await ids_kv.get(subjects.WATERMARK_KEY)
    await ids_kv.store.purge(subjects.WATERMARK_KEY)  # only the watermark: every record is still there
    await eventually(lambda: passed_on(ids_kv, sync, k8s.rv), what="repaired, watermark last")
    assert sync.epoch != epoch
    kept = {k: e for k, e in (await ids_kv.items()).items()
            if k.startswith("endpoints.") or (k.startswith("id.") and not e.value.reserved)}
    assert kept and all(e.revision > mark.revision for e in kept.values()), \
        {k: e.revision for k, e in kept.items() if e.revision <= mark.revision}
