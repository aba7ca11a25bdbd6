"""The sandbox API's store on disk (api_wal.py): objects and resourceVersions survive a restart, a torn last
line is dropped, compaction keeps the same contents, and watches from before the restart get 410."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from propolis_sandbox.api_resources import BY_KIND
from propolis_sandbox.api_selectors import FieldSelector, LabelSelector
from propolis_sandbox.api_store import ApiStatusError, Store
from propolis_sandbox.api_wal import LOG_FILE, SNAPSHOT_FILE, Wal

NS, POD, NP = BY_KIND["Namespace"], BY_KIND["Pod"], BY_KIND["NetworkPolicy"]


def pod(name: str) -> dict:
    return {"metadata": {"name": name, "labels": {"app": name}},
            "spec": {"containers": [{"name": "c", "image": "echo"}]}}


def deny_all(name: str) -> dict:
    return {"metadata": {"name": name}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}


def opened(directory: Path, **kw: int) -> Store:
    store = Store()
    store.attach_wal(Wal(directory, **kw))
    return store


def contents(store: Store) -> dict:
    return {r: sorted((k, o["metadata"]["resourceVersion"]) for k, o in b.items()) for r, b in store.objects.items()}


def fill(store: Store) -> None:
    store.create(NS, None, {"metadata": {"name": "default"}})
    for i in range(5):
        store.create(POD, "default", pod(f"p{i}"))
    store.create(NP, "default", deny_all("lockdown"))
    changed = store.get(POD, "default", "p1")
    changed["metadata"]["labels"]["app"] = "changed"
    store.update(POD, "default", "p1", changed)
    store.delete(POD, "default", "p2", grace_period=0)


def test_objects_and_resource_version_survive_a_restart(tmp_path: Path) -> None:
    first = opened(tmp_path)
    fill(first)
    before, rv = contents(first), first.rv
    # no close(): a killed process closes nothing
    second = opened(tmp_path)
    assert second.rv == rv and contents(second) == before
    assert second.get(POD, "default", "p1")["metadata"]["labels"]["app"] == "changed"
    assert second.find(POD, "default", "p2") is None
    created = second.create(POD, "default", pod("after"))
    assert int(created["metadata"]["resourceVersion"]) == rv + 1  # continues upward, never back


def test_a_watch_from_before_the_restart_gets_410_and_one_from_now_works(tmp_path: Path) -> None:
    first = opened(tmp_path)
    fill(first)
    second = opened(tmp_path)
    with pytest.raises(ApiStatusError) as err:
        second.watch(POD, "default", LabelSelector(), FieldSelector(), str(second.rv - 1))
    assert err.value.code == 410
    w = second.watch(POD, "default", LabelSelector(), FieldSelector(), str(second.rv))
    second.create(POD, "default", pod("new"))
    assert w.queue.get_nowait()[0] == "ADDED"


def test_a_torn_last_line_is_dropped(tmp_path: Path) -> None:
    first = opened(tmp_path)
    fill(first)
    rv = first.rv
    with open(tmp_path / LOG_FILE, "ab") as f:
        f.write(b'{"rv": 999, "g": "", "r": "pods", "t": "ADDED", "o": {"metad')
    second = opened(tmp_path)
    assert second.rv == rv and second.find(POD, "default", "p0") is not None


def test_compaction_keeps_the_same_contents(tmp_path: Path) -> None:
    first = opened(tmp_path, compact_every=3)
    fill(first)
    assert (tmp_path / LOG_FILE).stat().st_size < 3 * 1024  # compacted into the snapshot as it went
    before, rv = contents(first), first.rv
    second = opened(tmp_path)
    assert second.rv == rv and contents(second) == before
    assert (tmp_path / SNAPSHOT_FILE).exists() and os.stat(tmp_path / SNAPSHOT_FILE).st_mode & 0o077 == 0


def test_a_snapshot_newer_than_log_lines_wins(tmp_path: Path) -> None:
    """A kill between writing the snapshot and emptying the log leaves lines it already covers."""
    first = opened(tmp_path)
    fill(first)
    log_lines = (tmp_path / LOG_FILE).read_bytes()
    first.wal.compact()
    (tmp_path / LOG_FILE).write_bytes(log_lines)  # the old lines are back, as if the truncate never ran
    second = opened(tmp_path)
    assert contents(second) == contents(first)


def test_terminating_pods_are_finalized_after_a_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        first = opened(tmp_path)
        first.create(NS, None, {"metadata": {"name": "default"}})
        first.create(BY_KIND["Node"], None, {"metadata": {"name": "n1"}})
        p = pod("slow")
        p["spec"]["nodeName"] = "n1"
        first.create(POD, "default", p)
        first.delete(POD, "default", "slow", grace_period=0 + 1)  # terminating, waits for a kubelet
        first.close()
        second = Store()
        second.attach_wal(Wal(tmp_path))
        assert second.get(POD, "default", "slow")["metadata"]["deletionTimestamp"]
        for _ in range(60):
            if second.find(POD, "default", "slow") is None:
                break
            await asyncio.sleep(0.1)
        assert second.find(POD, "default", "slow") is None  # the pod GC timer was armed again
        second.close()
    asyncio.run(scenario())


def test_writes_are_answered_after_sync(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = opened(tmp_path)
        store.create(NS, None, {"metadata": {"name": "default"}})
        await store.sync()
        assert store.wal is not None and store.wal._synced == store.wal._written
        store.create(POD, "default", pod("x"))
        assert store.wal._synced < store.wal._written
        await asyncio.gather(store.sync(), store.sync())
        assert store.wal._synced == store.wal._written
    asyncio.run(scenario())
