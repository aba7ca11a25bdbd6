"""KvMirror on the reconciler contract, against a real nats-server: the bucket is its target.

A new leader diffs against the bucket and writes only differences, prunes only once every kind was
listed, and announces nothing (no watermark) before that; damage found after a watermark announced
the contents (a purged stream, a key deleted or written behind the owner's back) is re-written under
a new epoch with the watermark last; a standby writes nothing. The reflectors are played by calling
the sink protocol (`replace`, `apply`, `progress`) as they do.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from propolis.bus import subjects
from propolis.bus.messages import K8sObject, Watermark
from propolis.bus.watermark import new_epoch
from propolis.k8s.kinds import KINDS
from propolis.k8s.mirror import KvMirror

STREAM = f"KV_{subjects.K8S_BUCKET}"
NAMESPACES, PODS = KINDS["namespaces"], KINDS["pods"]


class ListedApi:
    """What the mirror asks of a reflector: the API's resourceVersion (a new leader's store check)."""

    list_started_at = list_finished_at = 0.0

    def __init__(self, resource_version: int) -> None:
        self.resource_version = resource_version

    def relist(self) -> None:
        self.list_started_at = self.list_finished_at = asyncio.get_running_loop().time()

    async def api_resource_version(self) -> int:
        return self.resource_version


def namespace(name: str, rv: int = 5, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": str(rv), "labels": labels}}


def pod(name: str, rv: int = 5) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "prod", "uid": f"uid-{name}", "resourceVersion": str(rv),
                         "labels": {"app": name}}, "spec": {"nodeName": "n1"}}


async def pages(*objects: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
    yield list(objects)


async def list_every_kind(mirror: KvMirror, rv: int, **listed: list[dict[str, Any]]) -> None:
    """One initial list per kind, as the reflectors do (objects first, then the kind's resourceVersion)."""
    for kind in KINDS.values():
        await mirror.replace(kind, pages(*listed.get(kind.plural, [])))
        mirror.progress(kind, str(rv))


async def eventually(check: Any, timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def k8s_kv(bus):
    return await bus.kv(subjects.K8S_BUCKET)


@pytest.fixture
async def run_mirror():
    """``run_mirror(mirror)`` runs the mirror's loop for the test; cancelled (and awaited) afterwards."""
    tasks: list[asyncio.Task[None]] = []

    def start(mirror: KvMirror) -> KvMirror:
        tasks.append(asyncio.create_task(mirror.run(), name="test-k8s-mirror"))
        return mirror

    yield start
    for t in tasks:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert not [r for r in results if not isinstance(r, asyncio.CancelledError)], results


async def contents(kv: Any) -> tuple[dict[str, Any], dict[str, int]]:
    entries = await kv.items()
    return {k: e.value for k, e in entries.items()}, {k: e.revision for k, e in entries.items()}


async def announced(kv: Any, mirror: KvMirror) -> bool:
    """The bucket's watermark is the mirror's current epoch, written after every object in the bucket."""
    values, revisions = await contents(kv)
    mark = values.get(subjects.WATERMARK_KEY)
    objects = [r for k, r in revisions.items() if isinstance(values[k], K8sObject)]
    return (isinstance(mark, Watermark) and mark.epoch == mirror.epoch and mirror.reconciler.idle()
            and revisions[subjects.WATERMARK_KEY] > max(objects, default=0))


async def test_new_leader_rewrites_every_key_under_its_epoch_and_prunes_once_every_kind_is_listed(k8s_kv, run_mirror):
    same, stale, gone = NAMESPACES.to_record(namespace("same")), NAMESPACES.to_record(namespace("stale")), \
        NAMESPACES.to_record(namespace("gone"))
    same_rev = await k8s_kv.put("namespaces._.same", same)
    await k8s_kv.put("namespaces._.stale", stale)
    await k8s_kv.put("namespaces._.gone", gone)
    old_mark = Watermark(5, 0.0, new_epoch())
    await k8s_kv.put(subjects.WATERMARK_KEY, old_mark)

    mirror = run_mirror(KvMirror(k8s_kv, repair_interval=60.0))
    mirror.reflectors = [ListedApi(9)]
    await mirror.set_leader(True)
    # every kind but the last listed: nothing pruned, nothing announced
    for kind in list(KINDS.values())[:-1]:
        listed = {"namespaces": [namespace("same"), namespace("stale", rv=9, changed="yes")],
                  "pods": [pod("web")]}.get(kind.plural, [])
        await mirror.replace(kind, pages(*listed))
        mirror.progress(kind, "9")
    await asyncio.sleep(0.3)
    values, _ = await contents(k8s_kv)
    assert "namespaces._.gone" in values and values[subjects.WATERMARK_KEY] == old_mark
    assert values["namespaces._.stale"] == stale, "written before the API store was checked"

    last = list(KINDS.values())[-1]
    await mirror.replace(last, pages())
    mirror.progress(last, "9")
    await eventually(lambda: announced(k8s_kv, mirror), what="the new leader's watermark")
    values, revisions = await contents(k8s_kv)
    assert "namespaces._.gone" not in values
    assert values["namespaces._.stale"].labels == {"changed": "yes"} and "pods.n1.prod.web" in values
    # under its new epoch the leader writes every key again, even one the bucket held: consumers holding a
    # purged key release it as gone unless the new epoch rewrote it (its load may predate a running purge)
    assert revisions["namespaces._.same"] > same_rev, "a key not rewritten under the new epoch"
    mark = values[subjects.WATERMARK_KEY]
    assert mark.resource_version == 9 and mark.epoch != old_mark.epoch
    assert mirror.repairs == 0, "a takeover's differences are not damage"


async def test_purged_bucket_is_rewritten_under_a_new_epoch_watermark_last(bus, k8s_kv, run_mirror):
    mirror = run_mirror(KvMirror(k8s_kv, repair_interval=60.0, probe_interval=0.1))
    await mirror.set_leader(True)
    await list_every_kind(mirror, 7, namespaces=[namespace("prod")], pods=[pod("web"), pod("api")])
    await eventually(lambda: announced(k8s_kv, mirror), what="first watermark")
    first_epoch = mirror.epoch

    await bus.js.purge_stream(STREAM)
    await eventually(lambda: announced(k8s_kv, mirror), what="the bucket refilled under a new epoch")
    values, _ = await contents(k8s_kv)
    assert {"namespaces._.prod", "pods.n1.prod.web", "pods.n1.prod.api"} <= set(values)
    assert mirror.epoch != first_epoch and mirror.repairs == 1

    # later changes flow, each followed by a watermark; no repair
    await mirror.apply(PODS, "DELETED", pod("api"))
    mirror.progress(PODS, "8")
    await eventually(lambda: announced(k8s_kv, mirror), what="a delete's watermark")
    values, _ = await contents(k8s_kv)
    assert "pods.n1.prod.api" not in values and values[subjects.WATERMARK_KEY].resource_version == 7  # min over kinds
    assert mirror.repairs == 1


async def test_key_deleted_or_written_behind_the_owners_back_is_repaired_by_the_refresh(k8s_kv, run_mirror):
    mirror = run_mirror(KvMirror(k8s_kv, repair_interval=0.3))
    await mirror.set_leader(True)
    await list_every_kind(mirror, 7, namespaces=[namespace("prod")], pods=[pod("web")])
    await eventually(lambda: announced(k8s_kv, mirror), what="first watermark")
    epochs = [mirror.epoch]

    await k8s_kv.delete("pods.n1.prod.web")  # the watermark stays: only the refresh round can see this
    await eventually(lambda: _has(k8s_kv, "pods.n1.prod.web"), what="deleted key re-written")
    await eventually(lambda: announced(k8s_kv, mirror), what="watermark of the repair")
    assert mirror.epoch not in epochs and mirror.repairs == 1
    epochs.append(mirror.epoch)

    await k8s_kv.put("pods.n1.prod.forged", PODS.to_record(pod("forged")))
    await eventually(lambda: _gone(k8s_kv, "pods.n1.prod.forged"), what="a key nobody desires pruned")
    await eventually(lambda: announced(k8s_kv, mirror), what="watermark of the second repair")
    assert mirror.epoch not in epochs and mirror.repairs == 2


async def test_pods_are_keyed_by_node_unscheduled_ones_wait_and_old_layout_keys_are_pruned(k8s_kv, run_mirror):
    """Pods are keyed ``pods.<node>.<ns>.<name>``: a leader taking over a bucket written with the old layout
    (``pods.<ns>.<name>``) prunes those keys like any key nobody desires; a Pod not scheduled yet is not
    mirrored (no node to key it under, no reader needs it) until it is."""
    await k8s_kv.put("pods.prod.web", PODS.to_record(pod("web")))  # written by a mirror before the node was in keys
    mirror = run_mirror(KvMirror(k8s_kv, repair_interval=60.0))
    await mirror.set_leader(True)
    pending = {**pod("pending"), "spec": {}}
    await list_every_kind(mirror, 7, namespaces=[namespace("prod")], pods=[pod("web"), pending])
    await eventually(lambda: announced(k8s_kv, mirror), what="first watermark")
    values, _ = await contents(k8s_kv)
    assert {k for k in values if k.startswith("pods.")} == {"pods.n1.prod.web"}

    await mirror.apply(PODS, "MODIFIED", {**pending, "spec": {"nodeName": "n2"}})  # scheduled
    await eventually(lambda: _has(k8s_kv, "pods.n2.prod.pending"), what="the pod mirrored once scheduled")
    await mirror.apply(PODS, "DELETED", {**pending, "spec": {"nodeName": "n2"}})
    await eventually(lambda: _gone(k8s_kv, "pods.n2.prod.pending"), what="its delete")


async def test_standby_and_held_bucket_write_nothing(k8s_kv, run_mirror):
    mirror = run_mirror(KvMirror(k8s_kv, store_reset_settle=60.0))
    mirror.reflectors = [ListedApi(7)]
    await list_every_kind(mirror, 7, namespaces=[namespace("prod")])
    await asyncio.sleep(0.3)
    assert await k8s_kv.items() == {}, "a standby wrote the bucket"

    await mirror.set_leader(True)
    await eventually(lambda: announced(k8s_kv, mirror), what="the leader's watermark")
    before = await contents(k8s_kv)
    mirror.enter_store_reset("test: the API serves another store")
    await mirror.apply(NAMESPACES, "ADDED", namespace("other"))
    await mirror.apply(NAMESPACES, "DELETED", namespace("prod"))
    await asyncio.sleep(0.3)
    assert await contents(k8s_kv) == before, "a held bucket was written"


async def _has(kv: Any, key: str) -> bool:
    return await kv.get(key) is not None


async def _gone(kv: Any, key: str) -> bool:
    return await kv.get(key) is None
