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

import logging
import time
from dataclasses import dataclass

from propolis.bus import subjects
from propolis.bus.lease import LeaseElector
from propolis.identity.allocator import IdentityAllocator
from propolis.identity.sync import IdentitySync
from propolis.reconcile import ReconciledComponent
from propolis.runtime.component import Component
from propolis.runtime.health import State
from propolis.runtime.service import Runtime, run_service
from propolis.runtime.settings import CommonSettings, setting

log = logging.getLogger("propolis.identity_allocator")
SERVICE = "identity-allocator"
#: a released k8s watermark not passed on for this long makes the component degraded, saying why
STALL_S = 5.0


@dataclass
class Settings(CommonSettings):
    identity_gc_grace: float = setting(900.0, "an unused identity is deleted after this long (Cilium: 15 min)",
                                       unit="s")
    identity_gc_interval: float = setting(10.0, "how often the lease holder looks for unused identities", unit="s")
    lease_duration: float = setting(10.0, "GC leader lease duration", unit="s")
    kv_repair_interval: float = setting(10.0, "how often the lease holder compares its whole bucket with what it "
                                              "wrote (its watermark is checked every second)", unit="s")


class GcLease(Component):
    name, title = "gc-lease", "the lease whose holder collects unused identities and repairs the bucket"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.lease: LeaseElector | None = None

    def is_holder(self) -> bool:
        return self.lease is not None and self.lease.is_leader

    async def start(self, rt: Runtime) -> None:
        kv = await rt.bus.kv(subjects.IDENTITIES_BUCKET)
        self.lease = LeaseElector(kv, subjects.IDENTITY_GC_LEASE_KEY, f"{rt.settings.node_name}/{rt.instance}",
                                  duration=self.settings.lease_duration)
        rt.spawn("lease", self.lease.run(), self)
        self.set_ok()

    async def stop(self) -> None:
        if self.lease is not None:
            await self.lease.release()


class EndpointRecords(Component):
    name, title = "endpoint-records", "pods and namespaces -> identities and endpoint records; the bucket's repair"

    def __init__(self, settings: Settings, lease: GcLease) -> None:
        super().__init__(lease)
        self.settings = settings
        self.lease = lease
        self.sync: IdentitySync | None = None
        self.rt: Runtime | None = None

    async def start(self, rt: Runtime) -> None:
        self.rt = rt
        ids_kv = await rt.bus.kv(subjects.IDENTITIES_BUCKET)
        self.sync = IdentitySync(ids_kv, IdentityAllocator(ids_kv, cluster_id=rt.settings.cluster_id),
                                 cluster=rt.settings.cluster_name, is_holder=self.lease.is_holder,
                                 gc_grace=self.settings.identity_gc_grace, gc_interval=self.settings.identity_gc_interval,
                                 repair_interval=self.settings.kv_repair_interval)
        await self.sync.load()
        rt.spawn("watch-k8s", self.sync.follow_k8s(await rt.bus.kv(subjects.K8S_BUCKET)), self)
        rt.spawn("watch-ids", self.sync.follow_identities(), self)
        rt.spawn("endpoint-records", self.sync.endpoints.run(), self)
        rt.spawn("identities-bucket", self.sync.run(on_step=self._report), self)

    def _report(self) -> None:
        """After each step of the sync's loop: progress into the heartbeat, the component's health."""
        assert self.rt is not None and self.sync is not None
        sync = self.sync
        self.rt.progress.update({"endpoints": len(sync.records.known), "identities": len(sync.users),
                                 "bucket_epoch": sync.epoch, "bucket_repairs": sync.repairs,
                                 "identities_collected": sync.gc_target.collected,
                                 "k8s_bucket_released": sync.k8s_gate.resource_version})
        if sync.last_watermark is not None:
            self.rt.progress["k8s_resource_version"] = str(sync.last_watermark.resource_version)
        records = sync.endpoints.health()
        if sync.k8s_gate.lost:
            self.set_degraded("the k8s bucket lost its watermark (purged?): keeping every endpoint record, "
                              "waiting for the k8s-watcher to refill it")
        elif not sync.k8s_gate.ready:
            self.set_degraded("waiting for the k8s bucket")
        elif records.state is not State.OK:
            self.set_degraded(records.reason)
        elif sync.watermark_pending is not None and time.monotonic() - sync.watermark_pending_since > STALL_S:
            self.set_degraded(f"k8s watermark {sync.watermark_pending.resource_version} not passed on for "
                              f"{time.monotonic() - sync.watermark_pending_since:.0f}s: {sync.pass_on_blocked()}")
        else:
            self.set_ok()


class IdentityGC(ReconciledComponent):
    name, title = "identity-gc", "release identities no endpoint record uses (lease holder, after the grace period)"

    def __init__(self, records: EndpointRecords) -> None:
        super().__init__(records)
        self.records = records

    async def start(self, rt: Runtime) -> None:
        assert self.records.sync is not None
        self.reconciler = self.records.sync.gc
        rt.spawn("identity-gc", self.reconciler.run(), self)
        self.set_ok()


def build(settings: Settings) -> list[Component]:
    lease = GcLease(settings)
    records = EndpointRecords(settings, lease)
    return [lease, records, IdentityGC(records)]


def main(argv: list[str] | None = None) -> int:
    return run_service(SERVICE, Settings, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
