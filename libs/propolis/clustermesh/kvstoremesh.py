"""KVStoreMesh: every remote cluster's export cached in the local ``PROPOLIS_CLUSTERMESH_CACHE_V1``.

Node services read only their own NATS: this component alone talks to remote clusters, each with that
cluster's read-only user (`bus.permissions.remote_reader_permissions`). A remote's keys land under
``<cluster>.<export key>`` through one `Reconciler`, so a remote that reconnects (its NATS restarted)
converges without stale keys, a disconnected remote (its config file removed) is withdrawn at once, and
keys of no connected remote are pruned once every remote delivered its initial export. A remote that
loses its connection keeps its cached state for ``cache_ttl`` seconds (Cilium's `clustermesh.cacheTTL`; 0,
the default, keeps it), then it is withdrawn until the remote is back and has synced again.
A remote announcing another name or id than its config, or this cluster's own name or id, is refused
and nothing of it is imported.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from propolis.bus import subjects
from propolis.bus.connection import Bus
from propolis.bus.kv import EventType
from propolis.bus.kv_target import KvTarget
from propolis.bus.messages import ClusterConfig
from propolis.clustermesh.remotes import RemoteCluster, load_remotes
from propolis.model import identity as idm
from propolis.reconcile import Reconciler
from propolis.runtime.component import Component
from propolis.runtime.service import Runtime

log = logging.getLogger("propolis.clustermesh.kvstoremesh")

REMOTES_POLL_S = 0.5
RETRY_S = 1.0


@dataclass
class RemoteStatus:
    """One remote cluster as `clustermesh status` shows it (Cilium: `ready`, `synced`, `status`)."""

    name: str
    id: int
    connected: bool = False
    synced: bool = False  # its initial export was read completely
    entries: int = 0
    error: str = ""
    keys: set[str] = field(default_factory=set)
    bus: Bus | None = None
    lost_since: float = 0.0  # monotonic time the connection was found lost (0 = connected or never)
    expired: bool = False  # cacheTTL ran out: its keys were withdrawn

    @property
    def ready(self) -> bool:
        return self.connected and self.synced and not self.error

    def report(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, "ready": self.ready, "connected": self.connected,
                "synced": self.synced, "entries": self.entries, "error": self.error, "expired": self.expired}


def refusal(local_name: str, local_id: int, remote: RemoteCluster, config: Any) -> str:
    """Why a remote's announced ClusterConfig cannot be imported ("" = it can)."""
    if not isinstance(config, ClusterConfig):
        return "the remote exports no cluster-config yet"
    if config.name != remote.name or config.id != remote.id:
        return (f"remote announces cluster {config.name!r} id {config.id}, "
                f"configured as {remote.name!r} id {remote.id}")
    if not local_id:
        return f"the local cluster {local_name!r} has no cluster id (1-255)"
    if config.name == local_name:
        return f"remote cluster {config.name!r} has the same name as the local cluster"
    if config.id == local_id:
        return f"remote cluster {config.name!r} has the same cluster id {config.id} as the local cluster {local_name!r}"
    return ""


def importable(remote: RemoteCluster, key: str, value: Any) -> bool:
    """A remote may only speak for itself: identities of its own id range (a deletion always passes)."""
    if key.startswith("identities.") and value is not None:
        number = getattr(value, "id", None)
        return isinstance(number, int) and idm.is_cluster_identity(number) and idm.cluster_id_of(number) == remote.id
    return True


class KvStoreMeshComponent(Component):
    name = "kvstoremesh"
    title = "caches every remote cluster's export in the local NATS"

    def __init__(self, *, cluster_name: str, cluster_id: int, remotes_dir: Path, cache_ttl: float = 0.0) -> None:
        super().__init__()
        self.cache_ttl = cache_ttl
        self.cluster_name = cluster_name
        self.cluster_id = cluster_id
        self.remotes_dir = remotes_dir
        self.remotes: dict[str, RemoteStatus] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.configs: dict[str, RemoteCluster] = {}
        self.scanned = False

    async def start(self, rt: Runtime) -> None:
        self.rt = rt
        self.cache: Reconciler[str, Any] = Reconciler(
            "clustermesh-cache", KvTarget(await rt.bus.kv(subjects.CLUSTERMESH_CACHE_BUCKET)), refresh_interval=300.0)
        rt.spawn("cache-reconciler", self.cache.run(), self)
        rt.spawn("follow-remotes", self._follow_remotes(), self)
        self.set_ok("no remote clusters")

    async def stop(self) -> None:
        for name in list(self.tasks):
            await self._drop(name)

    async def _follow_remotes(self) -> None:
        while True:
            configs = await asyncio.to_thread(load_remotes, self.remotes_dir)
            for name in [n for n in self.tasks if configs.get(n) != self.configs.get(n)]:
                await self._drop(name)
            for name, remote in configs.items():
                if name not in self.tasks:
                    self.configs[name] = remote
                    self.remotes[name] = RemoteStatus(name, remote.id)
                    self.tasks[name] = asyncio.create_task(self._mirror(remote), name=f"kvstoremesh-{name}")
            self.scanned = True
            self._expire(time.monotonic())
            self._report()
            await asyncio.sleep(REMOTES_POLL_S)

    async def _drop(self, name: str) -> None:
        """Disconnect: stop mirroring and withdraw every cached key of the cluster at once."""
        task = self.tasks.pop(name)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        status = self.remotes.pop(name)
        self.configs.pop(name, None)
        for key in status.keys:
            self.cache.remove(key)
        log.info("remote cluster %s disconnected: %d cached keys withdrawn", name, len(status.keys))

    def _expire(self, now: float) -> None:
        """cacheTTL: withdraw what a remote lost for longer than the TTL exported; it is re-imported (and
        re-diffed) at its next SYNCED after it is back."""
        for status in self.remotes.values():
            connected = status.bus is not None and status.bus.is_connected
            status.connected = connected
            if connected:
                status.lost_since = 0.0
                continue
            status.lost_since = status.lost_since or now
            if self.cache_ttl > 0 and not status.expired and now - status.lost_since >= self.cache_ttl:
                for key in status.keys:
                    self.cache.remove(key)
                log.warning("remote cluster %s unreachable for %.0fs (cacheTTL): %d cached keys withdrawn",
                            status.name, now - status.lost_since, len(status.keys))
                status.keys, status.entries, status.synced, status.expired = set(), 0, False, True

    async def _mirror(self, remote: RemoteCluster) -> None:
        status = self.remotes[remote.name]
        while True:
            bus = Bus(remote.nats_url, name=f"kvstoremesh-{self.cluster_name}@{remote.name}",
                      user=remote.user, password=remote.password)
            status.bus = bus
            try:
                await bus.connect(max_wait=5)
                # connected now: a loss the scan noted before (or "not connected yet" at start) is over, so
                # cacheTTL counts from the next loss, not from then
                status.connected, status.lost_since = True, 0.0
                kv = await bus.kv(subjects.CLUSTERMESH_BUCKET)
                await self._follow(remote, status, kv)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported per remote, retried; cached state is kept
                status.connected = False
                error = f"{type(exc).__name__}: {exc}"[:300]
                if error != status.error:  # once per new reason, not once per retry
                    log.warning("remote cluster %s: %s; retrying every %.0fs", remote.name, error, RETRY_S)
                status.error = error
                self._report()
                await asyncio.sleep(RETRY_S)
            finally:
                await bus.close(timeout=1)

    async def _follow(self, remote: RemoteCluster, status: RemoteStatus, kv: Any) -> None:
        seen: dict[str, Any] = {}
        async for ev in kv.watch(">"):
            if ev.type is EventType.SYNCED:
                status.expired = False
                why = refusal(self.cluster_name, self.cluster_id, remote, seen.get(subjects.CLUSTER_CONFIG_KEY))
                status.error = why
                status.synced = True
                wanted = {} if why else {subjects.clustermesh_cache_key(remote.name, k): v for k, v in seen.items()
                                         if importable(remote, k, v)}
                for key in status.keys - wanted.keys():
                    self.cache.remove(key)
                for key, value in wanted.items():
                    self.cache.upsert(key, value)
                status.keys = set(wanted)
                if why:
                    log.error("remote cluster %s refused: %s", remote.name, why)
            else:
                if ev.type is EventType.PUT:
                    seen[ev.key] = ev.value
                else:
                    seen.pop(ev.key, None)
                if status.synced and not status.error and not status.expired and importable(remote, ev.key, ev.value):
                    key = subjects.clustermesh_cache_key(remote.name, ev.key)
                    if ev.type is EventType.PUT:
                        self.cache.upsert(key, ev.value)
                        status.keys.add(key)
                    else:
                        self.cache.remove(key)
                        status.keys.discard(key)
            status.entries = len(status.keys)
            self._report()

    def _report(self) -> None:
        if self.scanned and all(s.synced for s in self.remotes.values()):
            self.cache.mark_synced()
        remotes = [s.report() for s in sorted(self.remotes.values(), key=lambda s: s.name)]
        ready = sum(1 for r in remotes if r["ready"])
        self.rt.progress["clustermesh"] = {"cluster_name": self.cluster_name, "cluster_id": self.cluster_id,
                                           "remotes": remotes, "ready": ready, "total": len(remotes)}
        self.rt.features["Cluster Mesh"] = {
            "state": f"{ready}/{len(remotes)} remote clusters ready",
            "detail": ", ".join(f"{r['name']}: {'ready' if r['ready'] else r['error'] or 'not synced'}"
                                for r in remotes)}
        errors = self.cache.errors()
        if ready < len(remotes) or errors:
            self.set_degraded(f"{ready}/{len(remotes)} remote clusters ready"
                              + (f", {len(errors)} cache errors" if errors else ""))
        else:
            self.set_ok(f"{ready}/{len(remotes)} remote clusters ready")
