"""One owner's keys of a KV bucket as a reconciler target (`propolis.reconcile.Target`).

Why one class: every service that owns a slice of a bucket (the writer's ipcache records, the DNS
proxy's FQDN record, the WireGuard key of a node, the Cluster Mesh export and cache) needs the same
three things — write only what differs (no new revision, no delivery to every watcher, when the bucket
already holds the value), delete with "missing" as done, and list what the bucket really holds under
the owner's key filter so the reconciler's prune and periodic refresh repair a key overwritten, deleted
or purged behind the owner's back.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from propolis.bus.kv import Kv


class KvTarget:
    """The keys of ``kv`` under ``keys`` (a key filter: ``>``, ``<node>.>``, or one exact key)."""

    def __init__(self, kv: Kv, keys: str = ">") -> None:
        self.kv = kv
        self.keys = keys

    async def update(self, key: str, desired: Any) -> None:
        current = await self.kv.get(key)
        if current is None or current.value != desired:
            await self.kv.put(key, desired)

    async def delete(self, key: str) -> None:
        await self.kv.delete(key)

    async def list_actual(self) -> Iterable[str]:
        return list(await self.kv.items(self.keys))
