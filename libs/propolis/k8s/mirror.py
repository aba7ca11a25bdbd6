"""The k8s-watcher's sink: the API's objects, normalized, in the PROPOLIS_K8S_V1 bucket.

It keeps two tables: ``desired`` (what the API holds, as last seen by the
reflectors) and ``written`` (what KV holds). Only the lease holder writes,
and only differences; a replica that becomes leader first diffs its desired
table against KV, so a takeover converges without a restart. Policies are
validated before they enter ``desired``: an invalid version is refused (log
line, bus event, object status) and the last valid version stays in force.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from propolis.bus import subjects
from propolis.bus.kv import Kv
from propolis.bus.messages import K8sObject, Watermark
from propolis.errors import ValidationError
from propolis.k8s.kinds import KINDS, POLICY_KINDS, Kind

log = logging.getLogger("propolis.k8s.mirror")

Validator = Callable[[Kind, dict[str, Any]], None]
RefusalHook = Callable[[Kind, dict[str, Any], ValidationError | None], Awaitable[None]]


def record_key(kind: Kind, obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return subjects.k8s_key(kind.plural, meta.get("namespace") if kind.namespaced else None, meta.get("name", ""))


class KvMirror:
    def __init__(self, kv: Kv, *, validate: Validator | None = None, on_verdict: RefusalHook | None = None) -> None:
        self.kv = kv
        self.validate = validate
        self.on_verdict = on_verdict
        self.desired: dict[str, K8sObject] = {}
        self.written: dict[str, K8sObject] = {}
        self.leader = False
        self.watermarks: dict[str, int] = {}
        self.refused: dict[str, str] = {}  # key -> error text, for status
        self.writes = 0
        self.dirty = False
        self.watermark_written = 0
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        """What KV already holds (from a previous leader or our previous life)."""
        self.written = {k: e.value for k, e in (await self.kv.items("*.*.*")).items()
                        if isinstance(e.value, K8sObject)}
        self.watermark_written = 0

    # --- Sink protocol ---------------------------------------------------------------
    async def replace(self, kind: Kind, pages: AsyncIterator[list[dict[str, Any]]]) -> None:
        keys = set()
        async for objects in pages:
            for obj in objects:
                keys.add(record_key(kind, obj))
                await self.apply(kind, "ADDED", obj)
        prefix = kind.plural + "."
        for key in [k for k in self.desired if k.startswith(prefix) and k not in keys]:
            await self._set(key, None)

    async def apply(self, kind: Kind, event_type: str, obj: dict[str, Any]) -> None:
        key = record_key(kind, obj)
        if event_type == "DELETED":
            self.refused.pop(key, None)
            await self._set(key, None)
            return
        if kind.plural in POLICY_KINDS and self.validate is not None:
            try:
                self.validate(kind, obj)
            except ValidationError as exc:
                self.refused[key] = str(exc)
                log.error("refused %s %s: %s (last valid version stays in force)", kind.kind, key, exc)
                if self.leader and self.on_verdict:
                    await self.on_verdict(kind, obj, exc)
                return
            if self.refused.pop(key, None) is not None and self.leader and self.on_verdict:
                await self.on_verdict(kind, obj, None)
        await self._set(key, kind.to_record(obj))

    def progress(self, kind: Kind, resource_version: str) -> None:
        try:
            self.watermarks[kind.plural] = int(resource_version)
        except ValueError:
            pass

    # --- status ----------------------------------------------------------------------
    def mirrored_resource_version(self) -> int:
        """Every kind has caught up to at least this resourceVersion (0 until all listed)."""
        if len(self.watermarks) < len(KINDS):
            return 0
        return min(self.watermarks.values())

    async def write_watermark(self) -> None:
        """Put the Watermark behind the objects it covers (leader only, when it moved).

        Under the write lock and only when nothing is pending (`dirty`): a watermark written
        while a new leader's first flush is still running would tell consumers "KV holds
        everything up to rv" when it does not."""
        async with self._lock:
            rv = self.mirrored_resource_version()
            if self.leader and rv > self.watermark_written and not self.dirty:
                await self.kv.put(subjects.WATERMARK_KEY, Watermark(rv, time.time()))
                self.watermark_written = rv

    # --- leadership and writes -------------------------------------------------------
    async def set_leader(self, leader: bool) -> None:
        if not leader:
            self.leader = False
            return
        self.dirty = True  # until the first flush has written everything desired
        async with self._lock:
            self.leader = True
            await self.load()
        await self.flush()

    async def flush(self) -> None:
        """Write every difference between desired and KV (leader only)."""
        async with self._lock:
            self.dirty = False
            try:
                for key in [k for k in self.written if k not in self.desired]:
                    await self._write(key, None)
                for key, rec in list(self.desired.items()):
                    if self.written.get(key) != rec:
                        await self._write(key, rec)
            except Exception:
                self.dirty = True  # the flush loop retries; no watermark meanwhile
                raise

    async def _set(self, key: str, rec: K8sObject | None) -> None:
        if rec is None:
            self.desired.pop(key, None)
        else:
            self.desired[key] = rec
        if self.leader and self.written.get(key) != rec:
            try:
                async with self._lock:
                    await self._write(key, rec)
            except Exception as exc:  # NATS away: desired is kept, the flush loop retries
                self.dirty = True
                log.warning("write %s to KV failed, will retry: %s", key, exc)

    async def _write(self, key: str, rec: K8sObject | None) -> None:
        if rec is None:
            await self.kv.delete(key)
            self.written.pop(key, None)
        else:
            await self.kv.put(key, rec)
            self.written[key] = rec
        self.writes += 1


