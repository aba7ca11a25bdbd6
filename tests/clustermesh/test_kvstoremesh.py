"""KVStoreMesh against real nats-servers: a local one (the `bus` fixture) and a remote one started here."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from propolis.bus import subjects
from propolis.bus.connection import Bus
from propolis.bus.embedded import EmbeddedNats
from propolis.bus.messages import ClusterConfig, IpcacheEntry
from propolis.clustermesh.kvstoremesh import KvStoreMeshComponent
from propolis.clustermesh.remotes import RemoteCluster, save_remote
from propolis.model import identity as idm
from propolis.runtime.service import Runtime
from propolis.runtime.settings import CommonSettings

REMOTE_IP = "10.2.1.5"


async def until(check, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def remote(tmp_path: Path):
    server = EmbeddedNats(tmp_path / "remote-nats")
    await server.start()
    admin = Bus(server.url, name="remote-admin")
    await admin.connect(max_wait=5)
    await admin.ensure_buckets()
    try:
        yield server, await admin.kv(subjects.CLUSTERMESH_BUCKET)
    finally:
        await admin.close(timeout=1)
        await server.stop()


async def started(bus: Bus, tmp_path: Path, remote_url: str, *, remote_id: int = 2, ttl: float = 0.0):
    save_remote(tmp_path / "remotes", RemoteCluster("c2", remote_id, remote_url, "", ""))
    component = KvStoreMeshComponent(cluster_name="c1", cluster_id=1, remotes_dir=tmp_path / "remotes", cache_ttl=ttl)
    rt = Runtime("clustermesh-apiserver", CommonSettings(nats_url=bus.url, node_name="test"), [component])
    await rt.bus.connect(max_wait=5)
    await component.start(rt)
    return rt, component


async def stopped(rt: Runtime, component: KvStoreMeshComponent) -> None:
    await component.stop()
    for task in list(rt._tasks):
        task.cancel()
    await asyncio.gather(*rt._tasks, return_exceptions=True)
    await rt.bus.close(timeout=1)


async def cached(bus: Bus) -> dict:
    return {k: e.value for k, e in (await (await bus.kv(subjects.CLUSTERMESH_CACHE_BUCKET)).items()).items()}


async def test_cache_ttl_withdraws_an_unreachable_remote(bus, remote, tmp_path):
    server, export = remote
    await export.put("cluster-config", ClusterConfig("c2", 2, ["10.2.0.0/16"]))
    await export.put(f"ip.{REMOTE_IP}", IpcacheEntry(REMOTE_IP, 32, idm.cluster_identity(300, 2), "n1", ""))
    rt, component = await started(bus, tmp_path, server.url, ttl=1.0)
    try:
        async def imported():
            return f"c2.ip.{REMOTE_IP}" in await cached(bus)
        await until(imported, what="the remote's export in the local cache")
        lost = time.monotonic()  # before the stop: the connection may drop (and the TTL start) while it runs
        await server.stop()

        async def withdrawn():
            return not await cached(bus)
        await until(withdrawn, what="cacheTTL to withdraw the unreachable remote")
        assert time.monotonic() - lost >= 0.9
        assert rt.progress["clustermesh"]["remotes"][0]["expired"] is True
    finally:
        await stopped(rt, component)


async def test_a_remote_claiming_the_local_id_is_refused(bus, remote, tmp_path):
    server, export = remote
    await export.put("cluster-config", ClusterConfig("c2", 1, ["10.2.0.0/16"]))
    await export.put(f"ip.{REMOTE_IP}", IpcacheEntry(REMOTE_IP, 32, idm.cluster_identity(300, 1), "n1", ""))
    rt, component = await started(bus, tmp_path, server.url, remote_id=1)
    try:
        async def refused():
            return "same cluster id 1" in (component.remotes["c2"].error if "c2" in component.remotes else "")
        await until(refused, what="the clash to be reported")
        assert not await cached(bus)
        assert rt.progress["clustermesh"]["ready"] == 0
    finally:
        await stopped(rt, component)
