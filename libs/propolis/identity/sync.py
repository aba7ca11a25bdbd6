"""The identity-allocator's work as reconcilers: pods -> endpoint records (and identities), identity GC.

* ``endpoint-records``: desired = one `EndpointSource` (the pod and its security labels) per pod that
  gets an identity, judged from the k8s bucket (pods, namespaces) as released by its `WatermarkGate`.
  `EndpointRecordTarget.update` allocates the labels' identity (CAS on the bucket: replicas agree) and
  writes the record; ``list_actual`` reads ``endpoints.*`` from the bus, so a record of a pod deleted
  while no allocator ran is pruned once the k8s bucket was delivered and covered by its watermark.
  A failing write is retried with back-off, per key (one pod never holds back the others);
  a `PermanentError` fails that pod only, named in health, until the pod changes.
* ``identity-gc``: desired = the identities our endpoint records use; an actual ``id.*`` nobody uses
  is released by the GC lease holder after ``identity-gc-grace`` (Cilium's identity GC).
* Bucket repair (the GC lease holder): the watermark is probed every second, and every
  ``kv-repair-interval`` a refresh round compares every record and the identities it uses with the
  bucket. Damage found after a watermark announced the contents moves to a new epoch before anything
  is re-written (same numbers: `IdentityAllocator.restore`); the watermark comes last.

Losing state is not deleting it: a purged k8s bucket freezes the desired table (the gate releases
nothing until the k8s-watcher refilled it under a new epoch), so no endpoint record is deleted.
The k8s watermark is passed on into our bucket, with our epoch, only once every change it covers
was attempted (the reconciler has nothing pending).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from propolis.bus import subjects
from propolis.bus.kv import EventType, Kv, KvEvent
from propolis.bus.messages import EndpointRecord, IdentityRecord, K8sObject, Watermark
from propolis.bus.watermark import WatermarkGate, new_epoch
from propolis.errors import TemporaryError
from propolis.identity.allocator import IdentityAllocator, labels_hash
from propolis.identity.endpoints import endpoint_for_pod
from propolis.model import identity as idmodel
from propolis.model.types import NumericIdentity
from propolis.reconcile import Reconciler, wait_event

log = logging.getLogger("propolis.identity.sync")

#: longest wait before retrying a pod's record (a pod waits for its identity before CNI ADD completes)
ENDPOINT_RETRY_MAX = 5.0
#: the owner's loop: watermark pass-on, the repair probe
TICK = 0.1


@dataclass(frozen=True)
class EndpointSource:
    """What a pod's endpoint record is made of: the pod and its security labels (sorted)."""

    pod: K8sObject
    labels: tuple[str, ...]


def endpoint_source(pod: K8sObject | None, namespace: K8sObject | None, cluster: str) -> EndpointSource | None:
    """A scheduled pod (not hostNetwork) gets its identity before it has an IP, so the datapath can
    enforce policy from its first packet (CNI ADD waits for the record); anything else gets none."""
    if pod is None or namespace is None or pod.fields.get("hostNetwork") or not pod.fields.get("nodeName"):
        return None
    labels = idmodel.pod_security_labels(
        pod_labels=pod.labels, namespace=pod.namespace, namespace_labels=namespace.labels,
        service_account=pod.fields.get("serviceAccountName") or "default", cluster=cluster)
    return EndpointSource(pod, tuple(sorted(str(lbl) for lbl in labels)))


class EndpointRecordTarget:
    """``endpoints.<ns>.<pod>`` -> EndpointRecord, allocating each label set's identity on the way.

    ``known`` is the records as last read or written (a pod keeps its number while its labels do,
    also across a purge); ``refresh`` compares the record and the identity it uses with the bucket
    (as read before the round, a mismatch confirmed on the key) and re-writes them, telling
    ``on_damage`` first. ``on_use`` sees every change of which identities the records use."""

    def __init__(self, kv: Kv, alloc: IdentityAllocator, *, on_damage: Callable[[str], None],
                 on_use: Callable[[NumericIdentity, list[str] | None], None]) -> None:
        self.kv = kv
        self.alloc = alloc
        self.on_damage = on_damage
        self.on_use = on_use  # (identity, labels) now used by one more record, (identity, None) one fewer
        self.known: dict[str, EndpointRecord] = {}
        #: A new epoch started and its watermark is not written yet: every record and the identity it uses is
        #: written again, whatever the bucket seems to hold. Consumers take a purged key the owner did not
        #: rewrite under a new epoch as gone, and the round's snapshot may predate a purge still running.
        self.rewrite_all = True
        self.wrote = asyncio.Event()
        self._snapshot: dict[str, Any] | None = None

    def load(self, records: dict[str, EndpointRecord]) -> None:
        for key, record in records.items():
            self._remember(key, record)

    async def update(self, key: str, desired: EndpointSource) -> None:
        if self.rewrite_all:
            await self.refresh(key, desired)
            return
        await self._write(key, endpoint_for_pod(desired.pod, await self._identity(key, desired.labels),
                                                list(desired.labels)))

    async def refresh(self, key: str, desired: EndpointSource) -> None:
        if self.rewrite_all:
            number = self._kept_identity(key, desired.labels)
            if number:
                await self.alloc.rewrite(number, list(desired.labels))
            record = endpoint_for_pod(desired.pod, number or await self._identity(key, desired.labels),
                                      list(desired.labels))
            await self.kv.put(key, record)
            self.wrote.set()
            self._remember(key, record)
            return
        snapshot = self._snapshot if self._snapshot is not None else await self.read_bucket()
        number = self._kept_identity(key, desired.labels)
        keys = {subjects.identity_key(number), subjects.identity_labels_key(labels_hash(desired.labels))}
        if number and not keys <= set(snapshot):
            self.on_damage(f"identity {number} of {key} missing")
            await self.alloc.restore(number, list(desired.labels))
        record = endpoint_for_pod(desired.pod, number or await self._identity(key, desired.labels),
                                  list(desired.labels))
        if snapshot.get(key) == record:
            return
        entry = await self.kv.get(key)  # the snapshot may predate a write: the key itself decides
        if entry is None or entry.value != record:
            self.on_damage(f"{key} {'missing' if entry is None else 'changed'}")
            await self.kv.put(key, record)
            self.wrote.set()
        self._remember(key, record)

    async def delete(self, key: str) -> None:
        await self.kv.delete(key)
        old = self.known.pop(key, None)
        if old is not None and old.identity:
            self.on_use(NumericIdentity(old.identity), None)
        self.wrote.set()

    async def list_actual(self) -> Iterable[str]:
        return list(await self.kv.items(subjects.ENDPOINT_KEYS))

    async def read_bucket(self) -> dict[str, Any]:
        """The bucket (from NATS) for a refresh round to compare with: read before the round, while writes go on."""
        self._snapshot = {k: e.value for k, e in (await self.kv.items()).items()}
        return self._snapshot

    def forget_snapshot(self) -> None:
        """The round is over: a copy of the bucket is not kept in memory."""
        self._snapshot = None

    def _kept_identity(self, key: str, labels: tuple[str, ...]) -> NumericIdentity:
        record = self.known.get(key)
        return NumericIdentity(record.identity if record is not None and tuple(record.labels) == labels else 0)

    async def _identity(self, key: str, labels: tuple[str, ...]) -> NumericIdentity:
        return self._kept_identity(key, labels) or await self.alloc.allocate(list(labels))

    async def _write(self, key: str, record: EndpointRecord) -> None:
        if self.rewrite_all or self.known.get(key) != record:
            await self.kv.put(key, record)
            self.wrote.set()
        self._remember(key, record)

    def _remember(self, key: str, record: EndpointRecord) -> None:
        old = self.known.get(key)
        self.known[key] = record
        if old is None or old.identity != record.identity:
            if record.identity:
                self.on_use(NumericIdentity(record.identity), record.labels)
            if old is not None and old.identity:
                self.on_use(NumericIdentity(old.identity), None)


class IdentityGCTarget:
    """Identity number -> labels. ``update``: in use (nothing to write: the record's writer made sure it
    exists). ``delete``, reached when nothing uses it (or by pruning an actual ``id.*`` nobody uses):
    the GC lease holder releases it once unused for ``grace``; before that, or on another replica,
    it stays (the next refresh round asks again). ``list_actual`` reads ``id.*`` from the bus."""

    def __init__(self, kv: Kv, alloc: IdentityAllocator, *, grace: float, is_holder: Callable[[], bool]) -> None:
        self.kv = kv
        self.alloc = alloc
        self.grace = grace
        self.is_holder = is_holder
        self.unused_since: dict[NumericIdentity, float] = {}
        self.actual: dict[NumericIdentity, list[str]] = {}  # non-reserved identities in the bucket, as last read
        self.collected = 0

    async def update(self, key: NumericIdentity, desired: list[str]) -> None:
        self.unused_since.pop(key, None)

    async def delete(self, key: NumericIdentity) -> None:
        if not self.is_holder():
            return
        now = time.monotonic()
        since = self.unused_since.setdefault(key, now)
        labels = self.actual.get(key)
        if labels is None or now - since < self.grace:
            return
        if not await self.alloc.release(key, labels):
            raise TemporaryError(f"identity {key}: its label index changed while releasing it")
        log.info("garbage-collected identity %d (unused for %.0fs)", key, now - since)
        self.unused_since.pop(key, None)
        self.actual.pop(key, None)
        self.collected += 1

    async def list_actual(self) -> Iterable[NumericIdentity]:
        self.actual = {NumericIdentity(e.value.id): e.value.labels for e in (await self.kv.items(subjects.IDENTITY_KEYS)).values()
                       if isinstance(e.value, IdentityRecord) and not e.value.reserved}
        return list(self.actual)


class IdentitySync:
    """The k8s bucket in (through its gate), the two reconcilers, the watermark pass-on, the repair."""

    def __init__(self, ids_kv: Kv, alloc: IdentityAllocator, *, cluster: str, is_holder: Callable[[], bool],
                 gc_grace: float, gc_interval: float, repair_interval: float, probe_interval: float = 1.0) -> None:
        self.kv = ids_kv
        self.alloc = alloc
        self.cluster = cluster
        self.is_holder = is_holder
        self.probe_interval = probe_interval
        self.pods: dict[tuple[str, str], K8sObject] = {}
        self.namespaces: dict[str, K8sObject] = {}
        self.k8s_gate = WatermarkGate(subjects.K8S_BUCKET)
        self.records = EndpointRecordTarget(ids_kv, alloc, on_damage=self._bucket_damaged, on_use=self._used)
        self.endpoints: Reconciler[str, EndpointSource] = Reconciler(
            "endpoint-records", self.records, refresh_interval=float("inf"), backoff_max=ENDPOINT_RETRY_MAX)
        self.gc_target = IdentityGCTarget(ids_kv, alloc, grace=gc_grace, is_holder=is_holder)
        self.gc: Reconciler[NumericIdentity, list[str]] = Reconciler("identity-gc", self.gc_target, refresh_interval=gc_interval)
        self.users: dict[NumericIdentity, int] = {}  # identity -> how many of our records use it
        self.repair_interval = repair_interval
        self.epoch = new_epoch()  # of our bucket's contents (changes when repaired)
        self.epoch_announced = False
        self.last_watermark: Watermark | None = None  # the k8s watermark last passed on
        self.watermark_pending: Watermark | None = None  # released by the gate, not passed on yet
        self.watermark_pending_since = 0.0  # monotonic time the oldest pending watermark was released
        self.repairs = 0
        self._next_probe = 0.0
        self._next_full = 0.0

    async def load(self) -> None:
        """What our bucket holds: used numbers (candidates skip them) and the records (pods keep theirs)."""
        await self.alloc.ensure_reserved(idmodel.reserved_identity_labels())
        records = {}
        for key, entry in (await self.kv.items()).items():
            if isinstance(entry.value, IdentityRecord):
                self.alloc.note_used(NumericIdentity(entry.value.id))
            elif isinstance(entry.value, EndpointRecord):
                records[key] = entry.value
        self.records.load(records)

    # --- inputs -----------------------------------------------------------------------------
    async def follow_k8s(self, kv: Kv, on_change: Callable[[], None] = lambda: None) -> None:
        """The k8s bucket through its gate: changes only once the watcher's watermark covers them."""
        async for ev in kv.watch(">"):
            released = self.k8s_gate.feed(ev)
            for change in released or ():
                self._k8s_change(change)
            if self.k8s_gate.ready:
                self.endpoints.mark_synced()  # the whole k8s bucket is in the table: pruning is safe
                self.gc.mark_synced()
            if released is not None:
                if self.watermark_pending is None:
                    self.watermark_pending_since = time.monotonic()
                self.watermark_pending = self.k8s_gate.watermark
            on_change()

    async def follow_identities(self) -> None:
        """Other replicas' allocations: keep the used set current so candidates rarely collide."""
        async for ev in self.kv.watch(subjects.IDENTITY_KEYS):
            if ev.type is EventType.PUT and isinstance(ev.value, IdentityRecord):
                self.alloc.note_used(NumericIdentity(ev.value.id))
            elif ev.type is EventType.DELETE:
                number = subjects.parse_identity_key(ev.key)
                if number is not None:
                    self.alloc.note_free(NumericIdentity(number))

    def _k8s_change(self, ev: KvEvent) -> None:
        parsed = subjects.parse_k8s_key(ev.key)
        if parsed is None:
            return  # the owner's own keys (lease, watermark)
        kind, ns, name = parsed.kind, parsed.namespace or "", parsed.name
        if kind == "pods":
            if ev.type is EventType.PUT:
                self.pods[(ns, name)] = ev.value
            else:
                self.pods.pop((ns, name), None)
            self._judge(ns, name)
        elif kind == "namespaces":
            if ev.type is EventType.PUT:
                self.namespaces[name] = ev.value
            else:
                self.namespaces.pop(name, None)
            for pod_ns, pod_name in [k for k in self.pods if k[0] == name]:
                self._judge(pod_ns, pod_name)

    def _judge(self, ns: str, name: str) -> None:
        key = subjects.endpoint_key(ns, name)
        pod = self.pods.get((ns, name))
        if pod is not None and ns not in self.namespaces:
            return  # its Namespace is not mirrored yet (kinds stream independently): judged again with it
        source = endpoint_source(pod, self.namespaces.get(ns), self.cluster)
        if source is None:
            self.endpoints.remove(key)
        else:
            self.endpoints.upsert(key, source)

    def _used(self, identity: NumericIdentity, labels: list[str] | None) -> None:
        count = self.users.get(identity, 0) + (1 if labels is not None else -1)
        if count > 0:
            self.users[identity] = count
            if labels is not None and count == 1:
                self.gc.upsert(identity, list(labels))
        else:
            self.users.pop(identity, None)
            self.gc.remove(identity)

    # --- the owner's loop -------------------------------------------------------------------
    async def run(self, on_step: Callable[[], None] = lambda: None) -> None:
        """Every TICK (or at once after a write): the watermark pass-on; on the GC holder, the repair
        probe and, every repair interval, a refresh round."""
        while True:
            try:
                await self.step()
            except Exception as exc:  # noqa: BLE001 - NATS away: the next round retries
                log.warning("identities bucket: %s", exc)
            on_step()
            await wait_event(self.records.wrote, TICK)  # the next step after TICK, or at once after a write
            self.records.wrote.clear()

    async def step(self) -> None:
        if self.endpoints.idle():
            self.records.forget_snapshot()
        now = time.monotonic()
        if self.is_holder() and self.k8s_gate.ready and self.epoch_announced and self.endpoints.idle():
            if now >= self._next_full:
                self._next_full = now + self.repair_interval
                await self.refresh_round()
            elif now >= self._next_probe:
                self._next_probe = now + self.probe_interval
                if await self.kv.get(subjects.WATERMARK_KEY) is None:
                    self._bucket_damaged("watermark gone")
                    await self.refresh_round()
        await self.pass_on()

    async def refresh_round(self) -> None:
        """Every record and the identity it uses compared with the bucket (the reserved ones first)."""
        await self.alloc.ensure_reserved(idmodel.reserved_identity_labels())
        await self.records.read_bucket()
        self.endpoints.queue_refresh()

    async def pass_on(self) -> None:
        """The k8s watermark into our bucket, stamped with our epoch, once every change it covers was
        attempted (a pod failed for good does not hold it back; one being retried does)."""
        mark = self.watermark_pending or self.last_watermark
        if mark is None or not self.k8s_gate.ready or not self.endpoints.idle():
            return
        if self.epoch_announced and mark == self.last_watermark and self.watermark_pending is None:
            return
        epoch = self.epoch
        await self.kv.put(subjects.WATERMARK_KEY, Watermark(mark.resource_version, time.time(), epoch))
        # what came while the put was on its way stays pending: a newer k8s watermark, a new epoch
        self.last_watermark = mark
        if self.watermark_pending is mark:
            self.watermark_pending = None
        if self.epoch == epoch:
            self.epoch_announced = True
            self.records.rewrite_all = False

    def pass_on_blocked(self) -> str:
        """Why a released k8s watermark is not passed on yet ("" when none waits): health shows a stall."""
        if self.watermark_pending is None:
            return ""
        if not self.k8s_gate.ready:
            return "the k8s bucket is not ready"
        pending = self.endpoints.pending_summary()
        return pending or "passing it on"

    def _bucket_damaged(self, what: str) -> None:
        """Damage after a watermark announced the contents: a new epoch before anything is re-written."""
        if not self.epoch_announced:
            log.warning("bucket %s: %s; re-writing it under epoch %s", self.kv.bucket, what, self.epoch)
            return
        self.repairs += 1
        self.epoch = new_epoch()
        self.epoch_announced = False
        self.records.rewrite_all = True
        self.endpoints.queue_refresh()  # records this round compared before the damage was found: again
        log.error("bucket %s lost contents (%s; %d endpoint records): re-writing them and the identities they use "
                  "under epoch %s, the watermark last", self.kv.bucket, what, len(self.records.known), self.epoch)
