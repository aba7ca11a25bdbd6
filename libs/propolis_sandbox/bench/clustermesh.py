"""`propolis bench clustermesh`: what importing remote clusters costs.

Two parts, printed per cluster count:
* **KVStoreMesh sync** over a real nats-server (no sandbox needed): one remote export of N endpoints is
  mirrored into the local cache by `KvStoreMeshComponent` (watch, reconciler, KV puts); initial sync time
  and the propagation delay of single changes (remote put -> cache row), p50/p99.
* **Importing side** (the datapath-writer's tables and desired ipcache, no I/O): C synthetic clusters x
  nodes x endpoints fed through `ClusterInputs.apply_clustermesh`, then `DesiredState.update`; time and
  Python heap per remote endpoint (tracemalloc), and the cost of one churn event (a remote pod changing
  identity, added, removed: apply + recompute + the rows handed to the writer's ipcache reconciler).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from propolis.bus import subjects
from propolis.bus.connection import Bus
from propolis.bus.embedded import EmbeddedNats
from propolis.bus.kv import EventType, KvEvent
from propolis.bus.messages import ClusterConfig, ClusterNode, IdentityRecord, IpcacheEntry
from propolis.clustermesh.kvstoremesh import KvStoreMeshComponent
from propolis.clustermesh.remotes import RemoteCluster, save_remote
from propolis.model import identity as idm
from propolis.model.types import NodeName
from propolis.runtime.service import Runtime
from propolis.runtime.settings import CommonSettings

IDENTITIES_PER_CLUSTER = 200


def _ip(cluster: int, n: int) -> str:
    return f"10.{cluster}.{n // 250}.{n % 250 + 1}"


def synthetic_export(cluster: int, name: str, nodes: int, endpoints: int) -> dict[str, Any]:
    """Export keys of one synthetic cluster (the shape `desired_export` writes)."""
    out: dict[str, Any] = {"cluster-config": ClusterConfig(name, cluster, [f"10.{cluster}.0.0/16"])}
    for n in range(nodes):
        out[f"nodes.{name}-{n}"] = ClusterNode(name, f"{name}-{n}", [f"172.{cluster % 16 + 16}.{n // 250}.{n % 250}"],
                                               [f"10.{cluster}.{n}.0/24"])
    for i in range(IDENTITIES_PER_CLUSTER):
        number = idm.cluster_identity(256 + i, cluster)
        out[f"identities.{number}"] = IdentityRecord(number, [f"k8s:app=app{i}", f"k8s:{idm.CLUSTER_LABEL}={name}",
                                                              "k8s:io.kubernetes.pod.namespace=default"])
    for e in range(endpoints):
        ip = _ip(cluster, e)
        out[f"ip.{ip}"] = IpcacheEntry(ip, 32, idm.cluster_identity(256 + e % IDENTITIES_PER_CLUSTER, cluster),
                                       f"{name}-{e % max(1, nodes)}", "")
    return out


def importing_side(clusters: int, nodes: int, endpoints: int) -> dict[str, Any]:
    from propolis.reconcile import Reconciler
    from propolis.writer.desired import DesiredState
    from propolis.writer.inputs import ClusterInputs

    events = [KvEvent(EventType.PUT, f"c{c}.{k}", v, 0)
              for c in range(1, clusters + 1) for k, v in synthetic_export(c, f"c{c}", nodes, endpoints).items()]
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    inputs = ClusterInputs()
    for ev in events:
        inputs.apply_clustermesh(ev)
    fed = time.perf_counter() - started
    tables = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    desired = DesiredState(node="bench-worker", cluster_name="local", default_local_cluster=True)
    ipcache: Reconciler[str, Any] = Reconciler("ipcache", None)  # type: ignore[arg-type]  # its desired table only
    started = time.perf_counter()
    desired.update(inputs, [])
    desired.hand_ipcache_changes(ipcache)
    first = time.perf_counter() - started
    churn = []
    for i in range(30):
        ip = _ip(1, i % 10) if i < 10 else f"10.1.250.{i % 10 + 1}"  # identity changes, then adds, then removes
        change = KvEvent(EventType.DELETE, f"c1.ip.{ip}", None, 0) if i >= 20 else KvEvent(
            EventType.PUT, f"c1.ip.{ip}", IpcacheEntry(ip, 32, idm.cluster_identity(256 + (i + 1) % 200, 1), "c1-0", ""), 0)
        started = time.perf_counter()
        inputs.apply_clustermesh(change)
        desired.update(inputs, [])
        desired.hand_ipcache_changes(ipcache)
        churn.append(time.perf_counter() - started)
    assert len(ipcache.desired) == len(desired.ipcache), "the reconciler's table follows the desired ipcache"
    total = clusters * endpoints
    return {"clusters": clusters, "nodes_per_cluster": nodes, "endpoints_per_cluster": endpoints,
            "remote_endpoints": total, "ipcache_rows": len(desired.ipcache),
            "feed_s": round(fed, 3), "feed_us_per_endpoint": round(fed / total * 1e6, 2),
            "tables_bytes_per_endpoint": round(tables / total),
            "first_desired_ipcache_s": round(first, 3),
            "churn_event_us_p50": round(statistics.median(churn) * 1e6, 1),
            "churn_event_us_max": round(max(churn) * 1e6, 1)}


async def kvstoremesh_sync(endpoints: int, changes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNats(Path(tmp) / "nats", log_file=None)
        url = await server.start()
        admin = Bus(url, name="bench-admin")
        rt: Runtime | None = None
        try:
            await admin.connect(max_wait=5)
            await admin.ensure_buckets()
            export = await admin.kv(subjects.CLUSTERMESH_BUCKET)
            cache = await admin.kv(subjects.CLUSTERMESH_CACHE_BUCKET)
            items = synthetic_export(2, "remote", 50, endpoints)
            await asyncio.gather(*(export.put(k, v) for k, v in items.items()))
            remotes = Path(tmp) / "remotes"
            save_remote(remotes, RemoteCluster("remote", 2, url, "", ""))
            component = KvStoreMeshComponent(cluster_name="local", cluster_id=1, remotes_dir=remotes)
            rt = Runtime("clustermesh-apiserver", CommonSettings(nats_url=url, node_name=NodeName("bench")), [component])
            await rt.bus.connect(max_wait=5)
            started = time.perf_counter()
            await component.start(rt)
            # the bench times the state it polls
            while component.cache.reconciled_revision < len(items) or \
                    not component.remotes.get("remote", None) or not component.remotes["remote"].synced:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            await component.cache.wait_until_reconciled(timeout=120)
            initial = time.perf_counter() - started
            delays = []
            for i in range(changes):
                ip = f"10.99.{i // 250}.{i % 250 + 1}"
                sent = time.perf_counter()
                key = subjects.export_ip_key(ip)
                await export.put(key, IpcacheEntry(ip, 32, idm.cluster_identity(300, 2), "remote-0", ""))
                while await cache.get(subjects.clustermesh_cache_key("remote", key)) is None:  # noqa: ASYNC110
                    await asyncio.sleep(0.002)
                delays.append(time.perf_counter() - sent)
            delays.sort()
            return {"remote_entries": len(items), "initial_sync_s": round(initial, 3),
                    "propagation_ms_p50": round(delays[len(delays) // 2] * 1e3, 1),
                    "propagation_ms_p99": round(delays[min(len(delays) - 1, int(len(delays) * 0.99))] * 1e3, 1)}
        finally:
            if rt is not None:
                for task in list(rt._tasks):
                    task.cancel()
                await component.stop()
                await rt.bus.close()
            await admin.close()
            await server.stop()


def run(clusters: list[int], nodes: int, endpoints: int, sync_endpoints: int, changes: int) -> dict[str, Any]:
    return {"kvstoremesh": asyncio.run(kvstoremesh_sync(sync_endpoints, changes)),
            "importing_side": [importing_side(c, nodes, endpoints) for c in clusters]}
