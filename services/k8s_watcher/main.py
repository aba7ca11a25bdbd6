"""k8s-watcher wiring: kubeconfig -> reflectors (one per kind) -> KvMirror, behind a KV lease.

State: `propolis bus kv PROPOLIS_K8S_V1`. Progress (the resourceVersion every
kind has caught up to) is in the heartbeat as ``k8s_resource_version``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from propolis.bus import subjects
from propolis.bus.lease import LeaseElector
from propolis.bus.messages import Event
from propolis.errors import ValidationError
from propolis.k8s import kubeclient
from propolis.k8s.kinds import KINDS, Kind
from propolis.k8s.kubeclient import ApiClient, Configuration
from propolis.k8s.mirror import KvMirror
from propolis.k8s.reflector import Reflector
from propolis.k8s.status import PolicyFailureReporter, patch_policy_status
from propolis.k8s.validate import validate_object
from propolis.runtime.component import Component
from propolis.runtime.health import State
from propolis.runtime.service import Runtime, run_service
from propolis.runtime.settings import CommonSettings, setting

log = logging.getLogger("propolis.k8s_watcher")
SERVICE = "k8s-watcher"


@dataclass
class Settings(CommonSettings):
    kubeconfig: str = setting("", "kubeconfig path (empty = in-cluster config)")
    lease_duration: float = setting(10.0, "leader lease duration; the holder renews every third", unit="s")
    watch_timeout: int = setting(300, "server-side timeout of one watch request before resuming", unit="s")
    kv_repair_interval: float = setting(10.0, "how often the leader compares the whole bucket with what it wrote "
                                              "(its watermark is checked every second)", unit="s")
    store_reset_settle: float = setting(10.0, "after the API's store went back (restore, loss), wait this long "
                                              "before re-listing every kind and replacing the bucket", unit="s")


class KubeClient(Component):
    name, title = "kube-client", "Kubernetes API client from kubeconfig or in-cluster config"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.api: ApiClient | None = None

    async def start(self, rt: Runtime) -> None:
        conf = Configuration()
        try:
            if self.settings.kubeconfig:
                await kubeclient.load_kube_config(config_file=self.settings.kubeconfig, client_configuration=conf)
            else:
                kubeclient.load_incluster_config(client_configuration=conf)
        except (kubeclient.ConfigException, OSError) as exc:
            # No API to watch (e.g. `propolis dev up`): stay up, say why, mirror nothing.
            self.set_degraded(f"no Kubernetes API configured: {exc}")
            return
        self.api = ApiClient(configuration=conf)

    async def stop(self) -> None:
        if self.api is not None:
            await self.api.close()


class Mirror(Component):
    name, title = "mirror", "reflect every watched kind into PROPOLIS_K8S_V1 while holding the lease"

    def __init__(self, settings: Settings, client: KubeClient) -> None:
        super().__init__(client)
        self.settings = settings
        self.client = client
        self.reflectors: list[Reflector] = []
        self.mirror: KvMirror | None = None
        self.lease: LeaseElector | None = None
        self.rt: Runtime | None = None
        self.failures = PolicyFailureReporter()

    async def start(self, rt: Runtime) -> None:
        self.rt = rt
        kv = await rt.bus.kv(subjects.K8S_BUCKET)
        self.mirror = KvMirror(kv, validate=validate_object, on_verdict=self._verdict,
                               repair_interval=self.settings.kv_repair_interval,
                               store_reset_settle=self.settings.store_reset_settle)
        holder = f"{rt.settings.node_name}/{rt.instance}"
        self.lease = LeaseElector(kv, subjects.K8S_WATCHER_LEASE_KEY, holder, duration=self.settings.lease_duration,
                                  on_change=self._leadership)
        if self.client.api is None:
            self.set_degraded("no Kubernetes API configured")
            return
        await self.lease.try_acquire()
        for kind in KINDS.values():
            r = Reflector(self.client.api, kind, self.mirror, watch_timeout=self.settings.watch_timeout)
            self.reflectors.append(r)
            rt.spawn(f"reflect-{kind.plural}", r.run(), self)
        self.mirror.reflectors = list(self.reflectors)
        rt.spawn("lease", self.lease.run(), self)
        rt.spawn("k8s-mirror", self.mirror.run(on_step=self._report), self)
        rt.spawn("policy-failures", self.failures.run(self.client.api, await rt.bus.kv(subjects.HEARTBEATS_BUCKET),
                                                      lambda: self.lease is not None and self.lease.is_leader), self)

    def _leadership(self, leader: bool) -> None:
        assert self.rt is not None and self.mirror is not None
        self.rt.spawn("leadership", self.mirror.set_leader(leader), self, one_shot=True)

    def _report(self) -> None:
        """After each step of the mirror's loop: progress into the heartbeat, the component's health."""
        assert self.rt is not None and self.mirror is not None and self.lease is not None
        self.rt.progress.update({
            "k8s_resource_version": str(self.mirror.mirrored_resource_version()),
            "leader": self.lease.is_leader, "objects": len(self.mirror.desired),
            "refused_policies": len(self.mirror.refused), "bucket_epoch": self.mirror.epoch,
            "bucket_repairs": self.mirror.repairs, "store_resets": self.mirror.store_resets,
            "store_reset": self.mirror.store_reset})
        unsynced = [r.kind.plural for r in self.reflectors if not r.synced.is_set()]
        failing = [f"{r.kind.plural}: {r.error}" for r in self.reflectors if r.error]
        bucket = self.mirror.reconciler.health()
        if self.mirror.store_reset:
            self.set_degraded(f"API store reset ({self.mirror.store_reset}): holding the mirrored state, "
                              "re-listing every kind before replacing it")
        elif failing:
            self.set_degraded("; ".join(failing)[:300])
        elif unsynced:
            self.set_degraded(f"waiting for initial list of {', '.join(unsynced)}")
        elif self.lease.is_leader and bucket.state is not State.OK:
            self.set_degraded(bucket.reason)
        else:
            self.set_ok("leader" if self.lease.is_leader else "standby")

    async def _verdict(self, kind: Kind, obj: dict[str, Any], error: ValidationError | None) -> None:
        """Make a refusal visible on the bus and in the object's status (or clear it)."""
        assert self.rt is not None and self.client.api is not None
        meta = obj.get("metadata") or {}
        ref = f"{kind.kind} {meta.get('namespace', '') + '/' if kind.namespaced else ''}{meta.get('name')}"
        if error is not None:
            try:
                await self.rt.bus.publish(subjects.events_subject("policy"), Event(
                    kind="PolicyRefused", object=ref, message=str(error), service=SERVICE,
                    node=self.rt.settings.node_name, time=time.time(), fields={"field": error.field}))
            except Exception as exc:  # noqa: BLE001 - the refusal is logged either way
                log.warning("could not publish refusal of %s: %s", ref, exc)
        try:
            await patch_policy_status(self.client.api, kind, obj, error, self.failures.for_object(kind, obj))
        except Exception as exc:  # noqa: BLE001 - a status patch is best effort
            log.warning("could not update status of %s: %s", ref, exc)

    async def stop(self) -> None:
        if self.lease is not None:
            await self.lease.release()


def build(settings: Settings) -> list[Component]:
    client = KubeClient(settings)
    return [client, Mirror(settings, client)]


def main(argv: list[str] | None = None) -> int:
    return run_service(SERVICE, Settings, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
