"""The k8s-watcher's sink: the API's objects, normalized, in the PROPOLIS_K8S_V1 bucket.

It keeps two tables: ``desired`` (what the API holds, as last seen by the
reflectors) and ``written`` (what KV holds). Only the lease holder writes,
and only differences; a replica that becomes leader first diffs its desired
table against KV, so a takeover converges without a restart. Policies are
validated before they enter ``desired``: an invalid version is refused (log
line, bus event, object status) and the last valid version stays in force.

Losing state is never read as deleting it (fail closed):

* Bucket epochs: every watermark carries ``epoch``, a random id picked whenever this owner
  (re)fills the bucket (new leader, repair, new API store). Consumers (``bus/watermark.py``) act
  only on what a watermark covers and, once the watermark vanished, only on a new epoch's.
* Self-repair (``check_bucket``): the leader probes its watermark every second and compares the
  whole bucket with what it wrote every ``repair_interval``; missing, changed or foreign keys are
  re-written under a new epoch, the watermark last, so a purged bucket heals by itself.
* API store reset: a resourceVersion that goes backwards (a list or watch event behind what a
  reflector saw, or the API behind the bucket's watermark when a leader takes over) or a
  ``kube-system`` namespace with another uid means the API serves a different store (restored
  from a backup, or lost). The mirror then holds the bucket as it is, waits
  ``store_reset_settle``, re-lists every kind, and only once every list finished replaces the
  bucket's contents under a new epoch. The condition is logged and reported while it lasts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

from propolis.bus import subjects
from propolis.bus.kv import Conflict, Kv
from propolis.bus.messages import K8sObject, Watermark
from propolis.bus.watermark import new_epoch
from propolis.errors import ValidationError
from propolis.k8s.kinds import KINDS, POLICY_KINDS, Kind

log = logging.getLogger("propolis.k8s.mirror")

Validator = Callable[[Kind, dict[str, Any]], None]
RefusalHook = Callable[[Kind, dict[str, Any], ValidationError | None], Awaitable[None]]


def record_key(kind: Kind, obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return subjects.k8s_key(kind.plural, meta.get("namespace") if kind.namespaced else None, meta.get("name", ""))


#: The API store's identity: a new (not restored) store creates kube-system with a new uid.
KUBE_SYSTEM_KEY = subjects.k8s_key("namespaces", None, "kube-system")


class Relistable(Protocol):
    """What the mirror needs of a reflector to re-read a new API store."""

    list_started_at: float
    list_finished_at: float

    def relist(self) -> None: ...
    async def api_resource_version(self) -> int: ...


class KvMirror:
    def __init__(self, kv: Kv, *, validate: Validator | None = None, on_verdict: RefusalHook | None = None,
                 repair_interval: float = 10.0, probe_interval: float = 1.0, store_reset_settle: float = 10.0) -> None:
        self.kv = kv
        self.repair_interval = repair_interval
        self.probe_interval = probe_interval
        self.store_reset_settle = store_reset_settle
        self.reflectors: list[Relistable] = []  # set by the owner: re-listed after a store reset
        self.epoch = ""  # of the contents this leader wrote
        self.verified = False  # the API serves the store the bucket mirrors (a new leader checks first)
        self.bucket_watermark: Watermark | None = None  # what the bucket said when we took over
        self.watermark_revision = 0  # KV revision of the watermark we last wrote or found (0 = none)
        self.writes_at_watermark = -1
        self.store_reset = ""  # why the bucket is held: the API serves another store
        self.store_reset_since = 0.0
        self.relist_requested_at: float | None = None
        self.store_resets = 0
        self.repairs = 0
        self._next_probe = 0.0
        self._next_full_check = 0.0
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

    @property
    def writable(self) -> bool:
        return self.leader and self.verified and not self.store_reset

    async def load(self) -> None:
        """What KV already holds (from a previous leader or our previous life)."""
        items = await self.kv.items()
        self.written = {k: e.value for k, e in items.items() if isinstance(e.value, K8sObject)}
        mark = items.get(subjects.WATERMARK_KEY)
        self.bucket_watermark = mark.value if mark is not None and isinstance(mark.value, Watermark) else None
        self.watermark_revision = mark.revision if mark is not None else 0
        self.watermark_written = 0
        self.writes_at_watermark = -1

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
        if key == KUBE_SYSTEM_KEY and event_type != "DELETED" and not self.store_reset:
            self._check_store_identity(self.desired.get(key), (obj.get("metadata") or {}).get("uid", ""))
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
            self.refused.pop(key, None)
            if self.leader and self.on_verdict:  # valid: the hook clears a refusal, names unenforced fields
                await self.on_verdict(kind, obj, None)
        await self._set(key, kind.to_record(obj))

    def progress(self, kind: Kind, resource_version: str) -> None:
        try:
            self.watermarks[kind.plural] = int(resource_version)
        except ValueError:
            pass

    def resource_version_regressed(self, kind: Kind, previous: int, current: int) -> None:
        self.enter_store_reset(f"{kind.plural} resourceVersion went back from {previous} to {current}")

    # --- API store reset ---------------------------------------------------------------
    def _check_store_identity(self, old: K8sObject | None, uid: str) -> None:
        if old is not None and old.uid and uid and old.uid != uid:
            self.enter_store_reset(f"namespace kube-system has uid {uid}, the mirror holds {old.uid}")

    def enter_store_reset(self, reason: str) -> None:
        """Hold the bucket as it is; the guard re-lists every kind after the settle time."""
        if self.store_reset:
            log.error("API store reset again (%s): restarting the %.0fs wait", reason, self.store_reset_settle)
        else:
            self.store_resets += 1
            log.error("API STORE RESET: %s. The API serves a different store (restored or lost): holding the "
                      "bucket's %d objects as they are (datapaths keep enforcing them), re-listing every kind "
                      "in %.0fs, then replacing the bucket's contents", reason, len(self.written),
                      self.store_reset_settle)
        self.store_reset = reason
        self.store_reset_since = time.monotonic()
        self.relist_requested_at = None

    async def _advance_store_reset(self, now: float) -> None:
        if self.relist_requested_at is None:
            if now - self.store_reset_since >= self.store_reset_settle:
                self.relist_requested_at = now
                log.warning("API store reset: re-listing every kind")
                for r in self.reflectors:
                    r.relist()
            return
        if all(r.list_started_at >= self.relist_requested_at and r.list_finished_at >= r.list_started_at
               for r in self.reflectors):
            await self._finish_store_reset()

    async def _finish_store_reset(self) -> None:
        gone = [k for k in self.written if k not in self.desired]
        log.error("API store reset: every kind re-listed; replacing the bucket's contents with the API's (%d objects, "
                  "%d deleted) under a new epoch (was: %s)", len(self.desired), len(gone), self.store_reset)
        async with self._lock:
            self.store_reset = ""
            self.relist_requested_at = None
            self.verified = self.leader
            self.epoch = new_epoch()
            self.watermark_written = 0
            self.writes_at_watermark = -1
            self.dirty = True
        await self.flush()
        await self.write_watermark()

    async def _verify_store(self) -> None:
        """A new leader writes only once the API serves the store the bucket mirrors."""
        mark, reason = self.bucket_watermark, ""
        if mark is not None and self.reflectors:
            api_rv = await self.reflectors[0].api_resource_version()
            if api_rv < mark.resource_version:
                reason = f"the API is at resourceVersion {api_rv}, behind the bucket's watermark {mark.resource_version}"
        if not reason:
            self._check_store_identity(self.written.get(KUBE_SYSTEM_KEY),
                                       getattr(self.desired.get(KUBE_SYSTEM_KEY), "uid", ""))
            if self.store_reset:
                return
        if reason:
            self.enter_store_reset(reason)
            return
        self.verified = True
        await self.flush()

    async def guard_step(self) -> None:
        """One round of the owner's checks (call every ~0.2 s): store reset, takeover check, repair."""
        now = time.monotonic()
        if self.store_reset:
            await self._advance_store_reset(now)
        elif self.leader and not self.verified:
            if self.mirrored_resource_version() > 0:
                await self._verify_store()
        elif self.leader and now >= self._next_probe:
            self._next_probe = now + self.probe_interval
            full = now >= self._next_full_check
            if full:
                self._next_full_check = now + self.repair_interval
            await self.check_bucket(full=full)

    # --- self-repair -------------------------------------------------------------------
    async def check_bucket(self, *, full: bool) -> bool:
        """Compare the bucket (read from NATS, not a cache) with what we wrote; re-write what is
        missing or changed, delete what we never wrote, under a new epoch. True if it repaired."""
        if not self.writable or self.dirty:
            return False
        if not full:
            mark = await self.kv.get(subjects.WATERMARK_KEY)
            if mark is not None and mark.revision == self.watermark_revision:
                return False
            if mark is None and not self.watermark_revision:
                return False  # no watermark written yet
        async with self._lock:
            actual = await self.kv.items()
            objects = {k: e.value for k, e in actual.items() if isinstance(e.value, K8sObject)}
            mark_entry = actual.get(subjects.WATERMARK_KEY)
            missing = sum(1 for k in self.written if k not in objects)
            changed = sum(1 for k, v in self.written.items() if k in objects and objects[k] != v)
            foreign = sum(1 for k in objects if k not in self.written)
            mark_ok = mark_entry is not None and mark_entry.revision == self.watermark_revision
            if not (missing or changed or foreign) and (mark_ok or not self.watermark_revision):
                return False
            self.repairs += 1
            self.epoch = new_epoch()
            log.error("bucket %s lost its contents: %d of our %d keys missing, %d changed, %d not ours, watermark "
                      "%s: re-writing it under epoch %s", self.kv.bucket, missing, len(self.written), changed,
                      foreign, "intact" if mark_ok else "gone or overwritten", self.epoch)
            # Under a new epoch consumers take every key the owner did not rewrite as gone, and a purge may
            # still be running behind our snapshot: rewrite every desired key, not only the missing ones.
            self.written = {k: v for k, v in objects.items() if k not in self.desired}
            self.watermark_revision = mark_entry.revision if mark_entry is not None else 0
            self.writes_at_watermark = -1
            self.dirty = True
        await self.flush()
        await self.write_watermark()
        return True

    # --- status ----------------------------------------------------------------------
    def mirrored_resource_version(self) -> int:
        """Every kind has caught up to at least this resourceVersion (0 until all listed)."""
        if len(self.watermarks) < len(KINDS):
            return 0
        return min(self.watermarks.values())

    async def write_watermark(self) -> None:
        """Put the Watermark behind the objects it covers (leader only, when it or the contents moved).

        Under the write lock and only when nothing is pending (`dirty`): a watermark written
        while a new leader's first flush is still running would tell consumers "KV holds
        everything up to rv" when it does not. Consumers act on a change only once a watermark
        follows it, so one follows every batch of writes. Compare-and-set on the revision we
        last wrote: if the watermark vanished or somebody else wrote it, the bucket is repaired
        (new epoch) instead of announcing a damaged bucket as complete."""
        async with self._lock:
            rv = self.mirrored_resource_version()
            if not self.writable or self.dirty or rv == 0:
                return
            if rv <= self.watermark_written and self.writes == self.writes_at_watermark:
                return
            mark = Watermark(rv, time.time(), self.epoch)
            try:
                if self.watermark_revision:
                    self.watermark_revision = await self.kv.update(subjects.WATERMARK_KEY, mark,
                                                                   self.watermark_revision)
                else:
                    self.watermark_revision = await self.kv.create(subjects.WATERMARK_KEY, mark)
            except Conflict as exc:
                log.error("watermark not written: %s; checking the whole bucket", exc)
                self._next_probe = self._next_full_check = 0.0
                return
            self.watermark_written = rv
            self.writes_at_watermark = self.writes

    # --- leadership and writes -------------------------------------------------------
    async def set_leader(self, leader: bool) -> None:
        if not leader:
            self.leader = False
            return
        self.dirty = True  # until the first flush has written everything desired
        async with self._lock:
            self.leader = True
            self.verified = False  # guard_step checks the API store, then flushes
            self.epoch = new_epoch()
            await self.load()

    async def flush(self) -> None:
        """Write every difference between desired and KV (leader, store verified, not held)."""
        async with self._lock:
            if not self.writable:
                return
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
        if self.writable and self.written.get(key) != rec:
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


