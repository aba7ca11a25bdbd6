"""The k8s-watcher's sink: the API's objects, normalized, in the PROPOLIS_K8S_V1 bucket.

The desired table (what the API holds, as last seen by the reflectors) is a `reconcile.Reconciler`'s,
and the bucket is its target (`K8sBucketTarget`): only the lease holder writes, only differences
(a new leader reads the bucket and diffs against it, so a takeover converges without a restart),
pruning only once every kind was listed, failed writes retried with back-off. Policies are validated
before they enter the table: an invalid version is refused (log line, bus event, object status)
and the last valid version stays in force.

Losing state is never read as deleting it (fail closed):

* Bucket epochs: every watermark carries ``epoch``, a random id picked whenever this owner
  (re)fills the bucket (new leader, repair, new API store). Consumers (``bus/watermark.py``) act
  only on what a watermark covers and, once the watermark vanished, only on a new epoch's. The
  watermark is written only when the reconciler has nothing left to attempt and nothing failed,
  under the lock every bucket write takes, so it always follows the writes it covers.
* Self-repair: the leader probes its watermark every ``probe_interval`` (gone or overwritten =
  the bucket was damaged: a refresh round now) and the reconciler's refresh round every
  ``repair_interval`` compares every key with the bucket (read from NATS) and prunes keys nobody
  desires. The first damage found (missing, changed or foreign key, lost watermark) after a
  watermark announced the contents moves the mirror to a new epoch before anything is re-written;
  the new epoch's watermark comes last, so a purged bucket heals by itself.
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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol

from propolis.bus import codec, subjects
from propolis.bus.kv import Conflict, Entry, Kv
from propolis.bus.messages import K8sObject, Watermark
from propolis.bus.snapshot import kv_snapshot
from propolis.bus.watermark import new_epoch
from propolis.errors import TemporaryError, ValidationError
from propolis.k8s.kinds import KINDS, POLICY_KINDS, Kind
from propolis.model.types import ResourceVersion, Revision
from propolis.reconcile import Reconciler, wait_event

log = logging.getLogger("propolis.k8s.mirror")

Validator = Callable[[Kind, dict[str, Any]], None]
RefusalHook = Callable[[Kind, dict[str, Any], ValidationError | None], Awaitable[None]]
#: the mirror's loop: store-reset hold, a new leader's store check, the watermark probe, the watermark
TICK = 0.05
#: longest wait before a failed bucket write is retried (the old flush loop's cadence: NATS back -> caught up in 1 s)
WRITE_RETRY_MAX = 1.0


def record_key(kind: Kind, obj: dict[str, Any]) -> str | None:
    """The object's key in the bucket; None for a Pod not scheduled yet: a node-scoped key needs the node
    (`subjects.NODE_SCOPED_KINDS`), and no reader needs such a Pod (no IP, no node to enforce on). It is
    mirrored once scheduled (``spec.nodeName`` never changes after that, so neither does its key)."""
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace") if kind.namespaced else None
    if kind.plural in subjects.NODE_SCOPED_KINDS:
        node = (obj.get("spec") or {}).get("nodeName") or ""
        return subjects.k8s_key(kind.plural, namespace, meta.get("name", ""), node=node) if node else None
    return subjects.k8s_key(kind.plural, namespace, meta.get("name", ""))


#: The API store's identity: a new (not restored) store creates kube-system with a new uid.
KUBE_SYSTEM_KEY = subjects.k8s_key("namespaces", None, "kube-system")


class Relistable(Protocol):
    """What the mirror needs of a reflector to re-read a new API store."""

    list_started_at: float
    list_finished_at: float

    def relist(self) -> None: ...
    async def api_resource_version(self) -> ResourceVersion: ...


async def bucket_objects(kv: Kv) -> dict[str, Entry]:
    """The bucket's Kubernetes objects as stored (encoded bytes, revision), read from NATS; leases and the
    watermark (keys starting with ``_``) left out. Not decoded: see `kv_snapshot`'s ``decode``."""
    entries = await kv_snapshot(kv.bus, kv.bucket, decode=False)
    return {k: e for k, e in entries.items() if not subjects.is_owner_key(k)}


class K8sBucketTarget:
    """PROPOLIS_K8S_V1's objects as a reconciler target: key -> K8sObject.

    ``known`` is what the bucket held when last read or written: ``update`` skips a put of what is
    already there. ``refresh`` and ``list_actual`` use the bucket as read for the round
    (`use_snapshot`: read by the mirror while writes go on, values kept encoded and compared with the
    encoding of what is desired), a mismatch confirmed by reading the key (an equal value encoded
    otherwise is no damage). A key found missing, changed or not ours is damage: ``on_damage`` is told
    before it is re-written (the mirror moves to a new epoch). Every write holds ``lock`` (the watermark's too) and
    is refused while ``may_write`` says no (a store reset holds the bucket from the same instant)."""

    def __init__(self, kv: Kv, *, lock: asyncio.Lock, may_write: Callable[[], str],
                 on_damage: Callable[[str], None]) -> None:
        self.kv = kv
        self.lock = lock
        self.may_write = may_write  # "" or why not
        self.on_damage = on_damage
        self.known: dict[str, K8sObject] = {}
        self.revisions: dict[str, Revision] = {}  # key -> KV revision of `known[key]`
        #: A new epoch started and its watermark is not written yet: every key is written again, whatever
        #: the bucket seems to hold. Consumers take a purged key the owner did not rewrite under a new epoch
        #: as gone, and a snapshot (a takeover's load, a refresh round) may predate a purge still running.
        self.rewrite_all = False
        self.writes = 0
        self.wrote = asyncio.Event()  # set by every write: the watermark can follow at once
        self._snapshot: dict[str, Entry] | None = None  # the bucket as stored, for one refresh round

    async def update(self, key: str, desired: K8sObject) -> None:
        if self.rewrite_all or self.known.get(key) != desired:
            async with self.lock:
                await self._write(key, desired)

    async def refresh(self, key: str, desired: K8sObject) -> None:
        if self.rewrite_all:
            async with self.lock:
                await self._write(key, desired)
            return
        snapshot = self._snapshot if self._snapshot is not None else await self._read()
        stored = snapshot.get(key)
        if stored is not None and self.known.get(key) == desired and \
                (stored.revision == self.revisions.get(key) or stored.value == codec.encode(desired)):
            return  # the revision we wrote (no encoding needed), or the same bytes
        async with self.lock:
            entry = await self.kv.get(key)  # the snapshot may predate a write: the key itself decides
            if entry is not None and entry.value == desired:
                self.known[key], self.revisions[key] = desired, Revision(entry.revision)
                return
            self.on_damage(f"{key} {'missing' if entry is None else 'changed'}")
            await self._write(key, desired)

    async def delete(self, key: str) -> None:
        async with self.lock:
            if key not in self.known:
                if await self.kv.get(key) is None:
                    return  # never written and not there
                self.on_damage(f"{key} was not written by this mirror")
            await self._write(key, None)

    async def list_actual(self) -> Iterable[str]:
        return list(self._snapshot if self._snapshot is not None else await self._read())

    def use_snapshot(self, snapshot: dict[str, Entry]) -> None:
        """The bucket as read (from NATS) just before a refresh round: what the round compares with."""
        self._snapshot = snapshot

    async def _read(self) -> dict[str, Entry]:
        self._snapshot = await bucket_objects(self.kv)
        return self._snapshot

    def forget_snapshot(self) -> None:
        """The round is over (nothing pending): a copy of the bucket is not kept in memory."""
        self._snapshot = None

    async def _write(self, key: str, rec: K8sObject | None) -> None:
        why_not = self.may_write()
        if why_not:
            raise TemporaryError(f"{self.kv.bucket}/{key} not written: {why_not}")
        if rec is None:
            await self.kv.delete(key)
            self.known.pop(key, None)
            self.revisions.pop(key, None)
        else:
            self.revisions[key] = Revision(await self.kv.put(key, rec))
            self.known[key] = rec
        self.writes += 1
        self.wrote.set()


class KvMirror:
    def __init__(self, kv: Kv, *, validate: Validator | None = None, on_verdict: RefusalHook | None = None,
                 repair_interval: float = 10.0, probe_interval: float = 1.0, store_reset_settle: float = 10.0) -> None:
        self.kv = kv
        self.probe_interval = probe_interval
        self.store_reset_settle = store_reset_settle
        self.reflectors: list[Relistable] = []  # set by the owner: re-listed after a store reset
        self._lock = asyncio.Lock()  # every bucket write, the watermark's included
        self.target = K8sBucketTarget(kv, lock=self._lock, may_write=self._why_not_writable,
                                      on_damage=self._bucket_damaged)
        self.repair_interval = repair_interval
        self._next_full = 0.0
        # refresh rounds are the mirror's to start (`refresh_round`), not the reconciler's own timer
        self.reconciler: Reconciler[str, K8sObject] = Reconciler(
            "k8s-mirror", self.target, refresh_interval=float("inf"), backoff_max=WRITE_RETRY_MAX)
        self.epoch = ""  # of the contents this leader writes
        self.epoch_announced = False  # a watermark of `epoch` was written: damage from now on needs a new epoch
        self.verified = False  # the API serves the store the bucket mirrors (a new leader checks first)
        self.bucket_watermark: Watermark | None = None  # what the bucket said when we took over
        self.watermark_revision = Revision(0)  # KV revision of the watermark we last wrote or found (0 = none)
        self.writes_at_watermark = -1
        self.store_reset = ""  # why the bucket is held: the API serves another store
        self.store_reset_since = 0.0
        self.relist_requested_at: float | None = None
        self.store_resets = 0
        self.repairs = 0
        self._next_probe = 0.0
        self.validate = validate
        self.on_verdict = on_verdict
        self.leader = False
        self._lease_held = False  # the latest word of the lease (leader follows once the bucket is loaded)
        self.watermarks: dict[str, ResourceVersion] = {}
        self.refused: dict[str, str] = {}  # key -> error text, for status
        self.watermark_written = 0

    @property
    def desired(self) -> dict[str, K8sObject]:
        """What the API holds (valid versions), as the reflectors last saw it: the reconciler's table."""
        return self.reconciler.desired

    @property
    def writable(self) -> bool:
        return self.leader and self.verified and not self.store_reset

    def _why_not_writable(self) -> str:
        if not self.leader:
            return "not the lease holder"
        if self.store_reset:
            return f"held after an API store reset ({self.store_reset})"
        return "" if self.verified else "the API store is not verified yet"

    async def load(self) -> None:
        """What KV already holds (from a previous leader or our previous life)."""
        items = await self.kv.items()
        objects = {k: e for k, e in items.items() if isinstance(e.value, K8sObject)}
        self.target.known = {k: e.value for k, e in objects.items()}
        self.target.revisions = {k: Revision(e.revision) for k, e in objects.items()}
        mark = items.get(subjects.WATERMARK_KEY)
        self.bucket_watermark = mark.value if mark is not None and isinstance(mark.value, Watermark) else None
        self.watermark_revision = Revision(mark.revision if mark is not None else 0)
        self.watermark_written = 0
        self.writes_at_watermark = -1

    # --- Sink protocol ---------------------------------------------------------------
    async def replace(self, kind: Kind, pages: AsyncIterator[list[dict[str, Any]]]) -> None:
        keys = set()
        async for objects in pages:
            for obj in objects:
                key = record_key(kind, obj)
                if key is not None:
                    keys.add(key)
                await self.apply(kind, "ADDED", obj)
        prefix = kind.plural + "."
        for key in [k for k in self.desired if k.startswith(prefix) and k not in keys]:
            self.reconciler.remove(key)

    async def apply(self, kind: Kind, event_type: str, obj: dict[str, Any]) -> None:
        key = record_key(kind, obj)
        if key is None:
            return  # a Pod not scheduled yet: mirrored once it is
        if key == KUBE_SYSTEM_KEY and event_type != "DELETED" and not self.store_reset:
            self._check_store_identity(self.desired.get(key), (obj.get("metadata") or {}).get("uid", ""))
        if event_type == "DELETED":
            self.refused.pop(key, None)
            self.reconciler.remove(key)
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
        self.reconciler.upsert(key, kind.to_record(obj))

    def progress(self, kind: Kind, resource_version: str) -> None:
        try:
            self.watermarks[kind.plural] = ResourceVersion(int(resource_version))
        except ValueError:
            pass

    def resource_version_regressed(self, kind: Kind, previous: ResourceVersion, current: ResourceVersion) -> None:
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
                      "in %.0fs, then replacing the bucket's contents", reason, len(self.target.known),
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
            self._finish_store_reset()

    def _finish_store_reset(self) -> None:
        """Every kind re-listed: the bucket is to be replaced (the reconciler diffs it, then the watermark)."""
        gone = [k for k in self.target.known if k not in self.desired]
        log.error("API store reset: every kind re-listed; replacing the bucket's contents with the API's (%d objects, "
                  "%d deleted) under a new epoch (was: %s)", len(self.desired), len(gone), self.store_reset)
        self.store_reset = ""
        self.relist_requested_at = None
        self.verified = self.leader
        self._start_epoch()
        self.watermark_written = 0

    async def _verify_store(self) -> None:
        """A new leader writes only once the API serves the store the bucket mirrors."""
        mark, reason = self.bucket_watermark, ""
        if mark is not None and self.reflectors:
            api_rv = await self.reflectors[0].api_resource_version()
            if api_rv < mark.resource_version:
                reason = f"the API is at resourceVersion {api_rv}, behind the bucket's watermark {mark.resource_version}"
        if not reason:
            self._check_store_identity(self.target.known.get(KUBE_SYSTEM_KEY),
                                       getattr(self.desired.get(KUBE_SYSTEM_KEY), "uid", ""))
            if self.store_reset:
                return
        if reason:
            self.enter_store_reset(reason)
            return
        self.verified = True

    # --- the owner's loop --------------------------------------------------------------
    async def run(self, on_step: Callable[[], None] | None = None) -> None:
        """Every TICK: the guard (store reset, a new leader's store check, the watermark probe), then
        the watermark. The reconciler writes the bucket while this replica may: started with a refresh
        round (diff against the bucket, prune) whenever it becomes writable, stopped when it is not."""
        writer: asyncio.Task[None] | None = None
        try:
            while True:
                if writer is not None and writer.done():
                    writer.result()  # the reconciler never returns: an exception is a bug, the service restarts
                try:
                    await self.guard_step()
                except Exception as exc:  # noqa: BLE001 - NATS or the API away: the next round retries
                    log.warning("bucket guard: %s", exc)
                if self.writable and writer is None:
                    self.reconciler.mark_synced()  # writable implies every kind was listed: pruning is safe
                    try:
                        await self.refresh_round()  # a new term or store: diff everything against the bucket
                    except Exception as exc:  # noqa: BLE001 - NATS away: the round reads the bucket itself
                        log.warning("bucket not read: %s", exc)
                        self.reconciler.queue_refresh()
                    writer = asyncio.create_task(self.reconciler.run(), name="k8s-mirror-reconciler")
                elif not self.writable and writer is not None:
                    writer.cancel()
                    await asyncio.gather(writer, return_exceptions=True)
                    writer = None
                if self.reconciler.idle():
                    self.target.forget_snapshot()
                if writer is not None:  # never before the first diff of this term was queued
                    try:
                        await self.write_watermark()
                    except Exception as exc:  # noqa: BLE001 - NATS away: the next round writes it
                        log.warning("watermark not written: %s", exc)
                if on_step is not None:
                    on_step()
                await wait_event(self.target.wrote, TICK)  # the next step after TICK, or at once after a write
                self.target.wrote.clear()
        finally:
            if writer is not None:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)

    async def guard_step(self) -> None:
        """One round of the owner's checks: store reset, takeover check, the watermark probe."""
        now = time.monotonic()
        if self.store_reset:
            await self._advance_store_reset(now)
        elif self.leader and not self.verified:
            if self.mirrored_resource_version() > 0:
                await self._verify_store()
        elif self.writable and self.reconciler.idle() and now >= self._next_full:
            self._next_probe = now + self.probe_interval
            await self.refresh_round()
        elif self.writable and now >= self._next_probe:
            self._next_probe = now + self.probe_interval
            await self.probe_watermark()

    # --- self-repair -------------------------------------------------------------------
    async def probe_watermark(self) -> bool:
        """The watermark is the cheap canary: gone or overwritten means the bucket was damaged (purged).
        Then a refresh round now (every key against the bucket, prune). True if it found damage."""
        mark = await self.kv.get(subjects.WATERMARK_KEY)
        revision = Revision(mark.revision if mark is not None else 0)
        if revision == self.watermark_revision:
            return False
        self._bucket_damaged(f"watermark {'gone' if mark is None else 'overwritten'}")
        await self.refresh_round()
        self.watermark_revision = revision  # only now: if the round could not start, the next probe retries
        return True

    async def refresh_round(self) -> None:
        """Every key compared with the bucket and what nobody desires pruned (the reconciler's refresh),
        against the bucket read here first, while the reconciler keeps writing changes."""
        self.target.use_snapshot(await bucket_objects(self.kv))
        self.reconciler.queue_refresh()
        self._next_full = time.monotonic() + self.repair_interval

    def _bucket_damaged(self, what: str) -> None:
        """Damage found after a watermark announced the contents: a new epoch before anything is
        re-written (consumers that saw the watermark vanish wait for it). Damage found while the epoch
        was not announced yet is repaired within it: its first watermark follows the repair anyway."""
        if not self.epoch_announced:
            log.warning("bucket %s: %s; re-writing it under epoch %s", self.kv.bucket, what, self.epoch)
            return
        self.repairs += 1
        self._start_epoch()
        log.error("bucket %s lost contents (%s, %d keys mirrored): re-writing it under epoch %s, the watermark last",
                  self.kv.bucket, what, len(self.desired), self.epoch)

    def _start_epoch(self) -> None:
        """A new epoch: every desired key is written again before its watermark (K8sBucketTarget.rewrite_all)."""
        self.epoch = new_epoch()
        self.epoch_announced = False
        self.target.rewrite_all = True
        self.reconciler.queue_refresh()

    # --- status ----------------------------------------------------------------------
    def mirrored_resource_version(self) -> ResourceVersion:
        """Every kind has caught up to at least this resourceVersion (0 until all listed)."""
        if len(self.watermarks) < len(KINDS):
            return ResourceVersion(0)
        return min(self.watermarks.values())

    async def write_watermark(self) -> None:
        """Put the Watermark behind the objects it covers (leader only, when it or the contents moved).

        Under the write lock and only when the reconciler has nothing left to attempt and nothing
        failed: a watermark written while a write is pending (a new leader's first diff, a repair)
        would tell consumers "KV holds everything up to rv" when it does not. The resourceVersion is
        read first: every object up to it is in the desired table then (reflectors apply before they
        report progress). Compare-and-set on the revision we last wrote: if the watermark vanished or
        somebody else wrote it, the probe repairs the bucket (new epoch) instead of announcing it."""
        async with self._lock:
            rv = self.mirrored_resource_version()
            if not self.writable or rv == 0 or not self.reconciler.idle() or self.reconciler.failed():
                return
            if self.epoch_announced and rv <= self.watermark_written and \
                    self.target.writes == self.writes_at_watermark:
                return
            epoch = self.epoch
            mark = Watermark(rv, time.time(), epoch)
            try:
                if self.watermark_revision:
                    self.watermark_revision = Revision(await self.kv.update(subjects.WATERMARK_KEY, mark,
                                                                            self.watermark_revision))
                else:
                    self.watermark_revision = Revision(await self.kv.create(subjects.WATERMARK_KEY, mark))
            except Conflict as exc:
                log.error("watermark not written: %s; checking the whole bucket", exc)
                self._next_probe = 0.0
                return
            self.watermark_written = rv
            self.writes_at_watermark = self.target.writes
            if self.epoch == epoch:  # a new term's epoch picked while this write was on its way is not announced
                self.epoch_announced = True
                self.target.rewrite_all = False

    # --- leadership --------------------------------------------------------------------
    async def set_leader(self, leader: bool) -> None:
        """Lease won: read the bucket, then (once the API store is verified) diff against it under a
        new epoch. Lease lost: stop writing at once."""
        self._lease_held = leader
        self.leader = False  # until the bucket is read (a re-won lease checks the store again too)
        if not leader:
            return
        self.verified = False  # guard_step checks the API store first
        self._start_epoch()
        await self.load()
        self.leader = self._lease_held
