"""identity-allocator wiring: K8S bucket (pods, namespaces) -> identities and endpoint records.

State: `propolis identity list`, `propolis endpoint list`, or
`propolis bus kv PROPOLIS_IDENTITIES_V1`.

Losing state is not deleting it: the k8s bucket is read through a ``WatermarkGate``, so a purged
k8s bucket freezes what the allocator knows (no endpoint record is deleted) until the k8s-watcher
refilled it under a new epoch. Its own bucket carries its own epoch in the watermark it passes
on, and the GC lease holder repairs it (endpoint records and the identities they use re-written,
new epoch) when its watermark vanished or, every ``kv_repair_interval``, when it differs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from propolis.bus import subjects
from propolis.bus.kv import Conflict, EventType, Kv, KvEvent
from propolis.bus.lease import LeaseElector
from propolis.bus.messages import EndpointRecord, IdentityIndex, IdentityRecord, K8sObject, Watermark
from propolis.bus.watermark import WatermarkGate, new_epoch
from propolis.identity.allocator import IdentityAllocator, labels_hash
from propolis.identity.endpoints import endpoint_for_pod
from propolis.errors import PermanentError
from propolis.model import identity as idmodel
from propolis.reconcile import backoff_delay
from propolis.runtime.component import Component
from propolis.runtime.service import Runtime, run_service
from propolis.runtime.settings import CommonSettings, setting

log = logging.getLogger("propolis.identity_allocator")
SERVICE = "identity-allocator"
#: longest wait before retrying a queue item (the queue is ordered: a longer wait would hold back every pod)
WORKER_RETRY_MAX = 5.0


@dataclass
class Settings(CommonSettings):
    identity_gc_grace: float = setting(900.0, "an unused identity is deleted after this long (Cilium: 15 min)",
                                       unit="s")
    identity_gc_interval: float = setting(10.0, "how often the lease holder looks for unused identities", unit="s")
    lease_duration: float = setting(10.0, "GC leader lease duration", unit="s")
    kv_repair_interval: float = setting(10.0, "how often the lease holder compares its whole bucket with what it "
                                              "wrote (its watermark is checked every second)", unit="s")


class Allocator(Component):
    name, title = "allocator", "allocate identities and write endpoint records from pods and namespaces"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.pods: dict[tuple[str, str], K8sObject] = {}
        self.namespaces: dict[str, K8sObject] = {}
        self.endpoints: dict[str, EndpointRecord] = {}  # key -> what we wrote / found in KV
        self.identities: dict[int, list[str]] = {}  # allocated (non-reserved) identities
        self.unused_since: dict[int, float] = {}
        self.k8s_gate = WatermarkGate(subjects.K8S_BUCKET)
        self.prune_due = False  # after (re)delivery of the k8s bucket: prune once its gate is ready
        self.epoch = new_epoch()  # of our bucket's contents (changes when repaired)
        self.last_watermark: Watermark | None = None  # the k8s watermark last passed on
        self.repairs = 0
        self.repair_queued = False
        self.queue: asyncio.Queue[tuple[str, str] | Watermark | object | None] = asyncio.Queue()
        self.lease: LeaseElector | None = None
        self.ids_kv: Kv | None = None
        self.alloc: IdentityAllocator | None = None

    async def start(self, rt: Runtime) -> None:
        self.rt = rt
        self.ids_kv = await rt.bus.kv(subjects.IDENTITIES_BUCKET)
        k8s_kv = await rt.bus.kv(subjects.K8S_BUCKET)
        self.alloc = IdentityAllocator(self.ids_kv, cluster_id=rt.settings.cluster_id)
        await self.alloc.ensure_reserved(idmodel.reserved_identity_labels())
        for key, entry in (await self.ids_kv.items()).items():
            v = entry.value
            if isinstance(v, IdentityRecord):
                self.alloc.note_used(v.id)
                if not v.reserved:
                    self.identities[v.id] = v.labels
            elif isinstance(v, EndpointRecord):
                self.endpoints[key] = v
        self.lease = LeaseElector(self.ids_kv, "_lease.identity-gc", f"{rt.settings.node_name}/{rt.instance}",
                                  duration=self.settings.lease_duration)
        rt.spawn("watch-k8s", self._watch(k8s_kv), self)
        rt.spawn("watch-ids", self._watch_ids(), self)
        rt.spawn("worker", self._worker(), self)
        rt.spawn("lease", self.lease.run(), self)
        rt.spawn("gc", self._gc_loop(), self)
        rt.spawn("repair", self._repair_loop(), self)

    async def _watch(self, kv: Kv) -> None:
        """The k8s bucket through its gate: changes only once the watcher's watermark covers them."""
        async for ev in kv.watch(">"):
            was_ready = self.k8s_gate.ready
            released = self.k8s_gate.feed(ev)
            if ev.type is EventType.SYNCED:
                self.prune_due = True
            for change in released or ():
                await self._k8s_change(change)
            if self.prune_due and self.k8s_gate.ready:
                self.prune_due = False
                await self.queue.put(None)  # prune marker, behind every pod it judges
            if released is not None:
                await self.queue.put(self.k8s_gate.watermark)  # processed after every object it covers
            if was_ready != self.k8s_gate.ready:
                self._report()

    def _report(self) -> None:
        if self.k8s_gate.ready:
            self.set_ok()
        elif self.k8s_gate.lost:
            self.set_degraded("the k8s bucket lost its watermark (purged?): keeping every endpoint record, "
                              "waiting for the k8s-watcher to refill it")
        else:
            self.set_degraded("waiting for the k8s bucket")

    async def _k8s_change(self, ev: KvEvent) -> None:
        kind, _, rest = ev.key.partition(".")
        ns, _, name = rest.partition(".")
        if kind == "pods":
            if ev.type is EventType.PUT:
                self.pods[(ns, name)] = ev.value
            else:
                self.pods.pop((ns, name), None)
            await self.queue.put((ns, name))
        elif kind == "namespaces":
            if ev.type is EventType.PUT:
                self.namespaces[name] = ev.value
            else:
                self.namespaces.pop(name, None)
            for pod_ns, pod_name in [k for k in self.pods if k[0] == name]:
                await self.queue.put((pod_ns, pod_name))

    async def _watch_ids(self) -> None:
        """Other replicas' allocations: keep the used set current so candidates rarely collide."""
        assert self.ids_kv is not None and self.alloc is not None
        async for ev in self.ids_kv.watch("id.>"):
            if ev.type is EventType.PUT and isinstance(ev.value, IdentityRecord):
                self.alloc.note_used(ev.value.id)
                if not ev.value.reserved:
                    self.identities[ev.value.id] = ev.value.labels
            elif ev.type is EventType.DELETE:
                number = int(ev.key.split(".", 1)[1])
                self.alloc.note_free(number)
                self.identities.pop(number, None)

    async def _worker(self) -> None:
        failures = 0  # consecutive: the back-off grows while NATS stays away, resets on the first success
        while True:
            item = await self.queue.get()
            try:
                if item is None:
                    await self._prune()
                elif isinstance(item, Watermark):
                    await self._pass_on(item)
                elif item is _REPAIR:
                    self.repair_queued = False
                    await self._repair()
                else:
                    await self._sync_pod(*item)  # type: ignore[misc]
                self.rt.progress["endpoints"] = len(self.endpoints)
                self.rt.progress["identities"] = len(self.identities)
                self.rt.progress["bucket_epoch"] = self.epoch
                self.rt.progress["bucket_repairs"] = self.repairs
                self._report()
                failures = 0
            except PermanentError as exc:  # retrying cannot help: named, dropped; its next change re-queues it
                log.error("sync %s failed permanently: %s", item, exc)
                self.set_degraded(f"sync of {item} failed: {exc}")
            except Exception as exc:  # NATS away: retry this item with the reconcilers' back-off
                failures += 1
                delay = backoff_delay(failures, maximum=WORKER_RETRY_MAX)
                log.warning("sync %s failed (attempt %d): %s; retrying in %.1fs", item, failures, exc, delay)
                self.set_degraded(f"sync failing: {exc}")
                await asyncio.sleep(delay)
                await self.queue.put(item)

    async def _pass_on(self, k8s_mark: Watermark) -> None:
        """The k8s watermark into our bucket, behind our writes, stamped with our own epoch."""
        assert self.ids_kv is not None
        await self.ids_kv.put(subjects.WATERMARK_KEY, Watermark(k8s_mark.resource_version, time.time(), self.epoch))
        self.last_watermark = k8s_mark
        self.rt.progress["k8s_resource_version"] = str(k8s_mark.resource_version)

    async def _repair_loop(self) -> None:
        """Probe our watermark every second, compare the whole bucket every kv_repair_interval (lease holder)."""
        assert self.lease is not None and self.ids_kv is not None
        next_full = time.monotonic() + self.settings.kv_repair_interval
        while True:
            await asyncio.sleep(1.0)
            if not (self.lease.is_leader and self.k8s_gate.ready and self.last_watermark is not None):
                continue
            try:
                full = time.monotonic() >= next_full
                if full:
                    next_full = time.monotonic() + self.settings.kv_repair_interval
                if not self.repair_queued and (full or await self.ids_kv.get(subjects.WATERMARK_KEY) is None):
                    self.repair_queued = True
                    await self.queue.put(_REPAIR)  # serialized with the worker's writes
            except Exception as exc:  # NATS away: next round
                log.debug("repair probe: %s", exc)

    async def _repair(self) -> None:
        """Re-write what our bucket lost: endpoint records, the identities they use, the watermark."""
        assert self.ids_kv is not None and self.alloc is not None and self.last_watermark is not None
        actual = await self.ids_kv.items()
        endpoints = [k for k, rec in self.endpoints.items() if getattr(actual.get(k), "value", None) != rec]
        in_use = {rec.identity: sorted(rec.labels) for rec in self.endpoints.values() if rec.identity}
        ids = [n for n in in_use if f"id.{n}" not in actual]
        index = [n for n, labels in in_use.items() if f"labels.{labels_hash(labels)}" not in actual]
        if not (endpoints or ids or index or subjects.WATERMARK_KEY not in actual):
            return
        self.repairs += 1
        self.epoch = new_epoch()
        log.error("bucket %s lost contents: %d endpoint records, %d identities, %d label indexes missing or changed, "
                  "watermark %s: re-writing them under epoch %s", subjects.IDENTITIES_BUCKET, len(endpoints),
                  len(ids), len(index), "gone" if subjects.WATERMARK_KEY not in actual else "intact", self.epoch)
        await self.alloc.ensure_reserved(idmodel.reserved_identity_labels())
        for number in ids:
            await self._recreate(f"id.{number}", IdentityRecord(number, in_use[number]))
        for number in index:
            await self._recreate(f"labels.{labels_hash(in_use[number])}", IdentityIndex(number, in_use[number]))
        for number, labels in in_use.items():
            self.alloc.note_used(number)
            self.identities[number] = labels
        for key in endpoints:
            await self.ids_kv.put(key, self.endpoints[key])
        await self._pass_on(self.last_watermark)

    async def _recreate(self, key: str, record: IdentityRecord | IdentityIndex) -> None:
        assert self.ids_kv is not None
        try:
            await self.ids_kv.create(key, record)
        except Conflict:
            log.warning("repair: %s was re-created by another replica meanwhile", key)

    async def _sync_pod(self, ns: str, name: str) -> None:
        assert self.ids_kv is not None and self.alloc is not None
        key = subjects.key("endpoints", ns, name)
        pod = self.pods.get((ns, name))
        namespace = self.namespaces.get(ns)
        labels = endpoint_labels = None
        # Every scheduled pod gets its identity before it has an IP, so the datapath can enforce
        # policy from the first packet (CNI ADD waits for this record).
        if pod is not None and namespace is None:
            return  # its Namespace is not mirrored yet (kinds stream independently): it re-queues the pod
        if pod is not None and not pod.spec.get("hostNetwork") and pod.spec.get("nodeName"):
            endpoint_labels = idmodel.pod_security_labels(
                pod_labels=pod.labels, namespace=ns, namespace_labels=namespace.labels,
                service_account=pod.spec.get("serviceAccountName") or "default",
                cluster=self.rt.settings.cluster_name)
            labels = sorted(str(lbl) for lbl in endpoint_labels)
        if labels is None:
            if key in self.endpoints:
                await self.ids_kv.delete(key)
                del self.endpoints[key]
            return
        number = await self.alloc.allocate(labels)
        self.identities[number] = labels
        record = endpoint_for_pod(pod, number, labels)
        if self.endpoints.get(key) != record:
            await self.ids_kv.put(key, record)
            self.endpoints[key] = record
        self.unused_since.pop(number, None)

    async def _prune(self) -> None:
        """After the initial sync: endpoint records of pods that no longer exist go."""
        assert self.ids_kv is not None
        live = {subjects.key("endpoints", ns, name) for ns, name in self.pods}
        for key in [k for k in self.endpoints if k not in live]:
            await self.ids_kv.delete(key)
            del self.endpoints[key]

    async def _gc_loop(self) -> None:
        assert self.lease is not None and self.alloc is not None
        while True:
            await asyncio.sleep(self.settings.identity_gc_interval)
            if not (self.k8s_gate.ready and self.lease.is_leader):
                continue
            in_use = {e.identity for e in self.endpoints.values()}
            now = time.monotonic()
            for number, labels in list(self.identities.items()):
                if number in in_use:
                    self.unused_since.pop(number, None)
                    continue
                since = self.unused_since.setdefault(number, now)
                if now - since >= self.settings.identity_gc_grace:
                    if await self.alloc.release(number, labels):
                        log.info("garbage-collected identity %d (unused for %.0fs)", number, now - since)
                        self.identities.pop(number, None)
                        self.unused_since.pop(number, None)

    async def stop(self) -> None:
        if self.lease is not None:
            await self.lease.release()


_REPAIR = object()  # worker item: compare our bucket with what we wrote


def build(settings: Settings) -> list[Component]:
    return [Allocator(settings)]


def main(argv: list[str] | None = None) -> int:
    return run_service(SERVICE, Settings, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
