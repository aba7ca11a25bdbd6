"""datapath-writer wiring: bus inputs + CNI announcements -> this node's BPF maps and tc programs.

Components, in start order:
1. datapath  — compile bpf_lxc.c once, adopt the node's pinned maps (nothing flushed: the
   programs already attached keep enforcing the last state while we start — fail closed),
   re-point every known endpoint's tc filters at the new programs (atomic replace).
2. inputs    — watch the k8s and identities buckets (ClusterInputs).
3. endpoints — the CNI socket; ADD answers once the endpoint is programmed.
4. enforcer  — recompute desired ipcache, per-endpoint policy and Service load-balancing on
   every input change and reconcile the maps (diffs; prune only after all inputs synced). Progress `k8s_resource_version` = the watermark the kernel state reflects.

State: `propolis bpf endpoint list --node N`, `propolis bpf policy get EP --node N`,
`propolis bpf ipcache list --node N`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from propolis.bus import subjects
from propolis.bus.messages import IpcacheEntry as IpcacheRecord
from propolis.datapath.datapath import Datapath, DatapathSettings
from propolis.model.identity import RESERVED_INIT
from propolis.reconcile import Reconciler
from propolis.runtime.component import Component
from propolis.runtime.health import Health, State
from propolis.runtime.service import Runtime, run_service
from propolis.runtime.settings import CommonSettings, setting
from propolis.writer import endpoint_state
from propolis.writer.desired import DesiredState
from propolis.writer.endpoint_api import EndpointAnnouncement, EndpointApiServer
from propolis.writer.endpoints import EndpointTable, LocalEndpoint
from propolis.writer.inputs import ClusterInputs
from propolis.writer.targets import EndpointPolicyTarget, IpcacheTarget

log = logging.getLogger("propolis.datapath_writer")
SERVICE = "datapath-writer"
#: how long a recompute waits for its changes to be attempted before it reports and retries
RECONCILE_WAIT = 30.0
#: a recompute pass that raised is tried again after this long, even without a new input change
RECOMPUTE_RETRY = 1.0


@dataclass
class Settings(CommonSettings):
    node_netns: str = setting("", "network namespace of the node's lxc interfaces (empty = this one)")
    bpf_pin_dir: str = setting("", "bpffs directory of this node's maps (empty = /sys/fs/bpf/propolis/<node>)")
    datapath_socket: str = setting("/run/propolis/datapath.sock", "unix socket the CNI plugin announces endpoints on")
    policy_enforcement: str = setting("default", "Cilium's policy enforcement mode",
                                      choices=("default", "always", "never"))
    allow_localhost: str = setting("always", "Cilium's allow-localhost: 'always' = a pod's own node reaches it "
                                             "whatever the ingress policy (kubelet probes), 'policy' = only if "
                                             "a rule allows the host", choices=("always", "policy"))
    identity_wait: float = setting(3.0, "how long a CNI ADD waits for the pod's identity before the endpoint "
                                        "starts as deny-all (fail closed)", unit="s")
    recompute_debounce: float = setting(0.005, "coalesce input changes for this long before recomputing", unit="s")
    kube_proxy_replacement: bool = setting(True, "Cilium's kubeProxyReplacement: Service load-balancing in eBPF "
                                                 "(false = left to kube-proxy)")
    lb_algorithm: str = setting("random", "Cilium's loadBalancer.algorithm", choices=("random", "maglev"))
    devices: str = setting("", "Cilium's devices: comma-separated node interfaces that get the NodePort "
                               "program (cil_from_netdev)")


class DatapathComponent(Component):
    name, title = "datapath", "compile bpf_lxc.c once, adopt pinned maps, re-attach known endpoints"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.dp = Datapath(settings.node_name, settings.bpf_pin_dir or None, netns=settings.node_netns or None,
                           settings=DatapathSettings(kube_proxy_replacement=settings.kube_proxy_replacement,
                                                     lb_algorithm=settings.lb_algorithm))

    async def start(self, rt: Runtime) -> None:
        await self.dp.load()
        count = await self.dp.reattach_all()
        log.info("datapath loaded in %.2fs; %d endpoints re-attached", self.dp.compile_seconds, count)
        if self.dp.removed_on_reattach:
            log.warning("endpoints %s removed: their interfaces are gone (pods deleted while no writer ran)",
                        self.dp.removed_on_reattach)
        devices = [d.strip() for d in self.settings.devices.split(",") if d.strip()]
        if self.settings.kube_proxy_replacement:
            for device in devices:
                await self.dp.attach_netdev(device)
        rt.progress["compile_seconds"] = round(self.dp.compile_seconds, 3)
        rt.features["Policy enforcement"] = {"state": self.settings.policy_enforcement.capitalize(),
                                             "detail": "L3/L4 in eBPF on every pod veth"}
        if self.settings.kube_proxy_replacement:
            rt.features["KubeProxyReplacement"] = {
                "state": "True", "detail": f"Service load-balancing in eBPF ({self.settings.lb_algorithm}); "
                                           f"NodePort on {', '.join(devices) or 'no device'}"}
        else:
            rt.features["KubeProxyReplacement"] = {"state": "False",
                                                   "detail": "kubeProxyReplacement=false: kube-proxy routes Services"}

    async def stop(self) -> None:
        await self.dp.close()  # programs stay attached, maps stay pinned: enforcement continues


class InputsComponent(Component):
    name, title = "inputs", "watch the k8s and identities buckets"

    def __init__(self) -> None:
        super().__init__()
        self.inputs = ClusterInputs()

    async def start(self, rt: Runtime) -> None:
        k8s = await rt.bus.kv(subjects.K8S_BUCKET)
        ids = await rt.bus.kv(subjects.IDENTITIES_BUCKET)
        rt.spawn("inputs", self.inputs.follow(k8s, ids), self)


class Enforcer(Component):
    name, title = "enforcer", "reconcile ipcache and per-endpoint policy maps to the desired state"

    def __init__(self, settings: Settings, datapath: DatapathComponent, inputs: InputsComponent) -> None:
        super().__init__()
        self.settings = settings
        self.dp = datapath.dp
        self.inputs = inputs.inputs
        self.table = EndpointTable(Path(settings.datapath_socket).with_name(f"endpoints-{settings.node_name}.json"))
        self.desired = DesiredState(node=settings.node_name, mode=settings.policy_enforcement,
                                    cluster_name=settings.cluster_name,
                                    allow_localhost=settings.allow_localhost == "always")
        self.ipcache = Reconciler("ipcache", IpcacheTarget(self.dp))
        self.policies = Reconciler("endpoint-policy", EndpointPolicyTarget(self.dp))
        self.api: EndpointApiServer | None = None
        self.enforced_watermark = 0
        self.services_written = -1  # desired.services_generation last written to the LB maps
        self.published: dict[str, IpcacheRecord] = {}

    async def start(self, rt: Runtime) -> None:
        self.rt = rt
        self.table.load()
        known = {e.endpoint_id for e in self.dp.list_endpoints()}
        for ep_id in [i for i in self.table.by_id if i not in known]:
            self.table.remove(ep_id)  # its pinned entry is gone (node rebooted): forget it
        # CIDR identities keep the numbers the kernel already uses (no renumbering across a restart)
        self.desired.engine.adopt_cidr_identities({e.cidr: e.identity for e in self.dp.list_ipcache()})
        self.ipcache_kv = await rt.bus.kv(subjects.IPCACHE_BUCKET)
        # what a previous instance published: entries of endpoints gone meanwhile get deleted by the
        # next publish (starting from nothing, they stayed in every node's ipcache for good)
        mine = await self.ipcache_kv.items(subjects.token(self.settings.node_name, what="node") + ".>")
        self.published = {k: e.value for k, e in mine.items() if isinstance(e.value, IpcacheRecord)}
        rt.spawn("ipcache-reconciler", self.ipcache.run(), self)
        rt.spawn("policy-reconciler", self.policies.run(), self)
        rt.spawn("recompute", self._recompute_loop(), self)
        self.api = EndpointApiServer(self.settings.datapath_socket, self.handle_cni)
        await self.api.start()

    async def stop(self) -> None:
        if self.api is not None:
            await self.api.stop()

    # --- CNI ----------------------------------------------------------------------------
    async def handle_cni(self, req: EndpointAnnouncement) -> dict[str, Any]:
        if req.op == "EndpointDelete":
            ep = self.table.find_container(req.container_id) or self.table.find_pod(req.namespace, req.pod)
            if ep is not None:
                await self.dp.detach_endpoint(ep.endpoint_id, netns=self.settings.node_netns or None)
                self.table.remove(ep.endpoint_id)
                self.policies.remove(ep.endpoint_id)
                self.inputs.changed.set()
            return {"ok": True}
        started = time.perf_counter()
        ep = self.table.find_container(req.container_id)
        if ep is None:
            taken = {e.endpoint_id for e in self.dp.list_endpoints()}
            ep = LocalEndpoint(endpoint_id=self.table.allocate_id(taken), container_id=req.container_id,
                               namespace=req.namespace, pod=req.pod, ip=req.ipv4, ifindex=req.host_ifindex,
                               host_ifname=req.host_ifname, netns=req.netns)
        ep.ip, ep.ifindex, ep.host_ifname = req.ipv4, req.host_ifindex, req.host_ifname
        identity = await self._wait_identity(ep)
        ep.identity = identity or RESERVED_INIT
        policy = self.desired.endpoint_policy(self.inputs, ep) if identity else None
        # Fail closed: until its identity and policy are known, an endpoint enforces both directions
        # with an empty policy map (deny all); the enforcer opens it as soon as they are.
        await self.dp.attach_endpoint(endpoint_id=ep.endpoint_id, ip=ep.ip, identity=ep.identity,
                                      ifindex=ep.ifindex, netns=self.settings.node_netns or None,
                                      ingress_enforced=True, egress_enforced=True)
        self.table.add(ep)
        failure = ""
        if policy is not None:  # through the reconciler: the one writer of policy maps
            try:
                failed = await self.policies.wait_until_reconciled(self.policies.upsert(ep.endpoint_id, policy),
                                                                   timeout=self.settings.identity_wait)
                failure = failed.get(ep.endpoint_id, "")
            except asyncio.TimeoutError:
                failure = "policy not written yet"
        self.inputs.changed.set()  # ipcache and other endpoints' policies may name this pod
        seconds = time.perf_counter() - started
        self.rt.progress["last_attach_ms"] = round(seconds * 1000, 2)
        state = ("deny-all until identity is known" if policy is None else
                 f"deny-all: {failure}" if failure else "programmed")
        return {"ok": True, "endpointID": ep.endpoint_id, "identity": ep.identity, "policy": state}

    async def _wait_identity(self, ep: LocalEndpoint) -> int:
        deadline = time.monotonic() + self.settings.identity_wait
        while True:
            record = self.inputs.endpoints.get((ep.namespace, ep.pod))
            if record is not None and record.identity and self.inputs.synced:
                return record.identity
            if time.monotonic() >= deadline:
                log.warning("no identity for %s/%s after %.1fs: endpoint starts deny-all",
                            ep.namespace, ep.pod, self.settings.identity_wait)
                return 0
            self.inputs.changed.clear()
            try:
                await asyncio.wait_for(self.inputs.changed.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                pass

    # --- the loop -------------------------------------------------------------------------
    async def _recompute_loop(self) -> None:
        """Never ends on a bad input: a failing object is the reconciler's per-key error (shown in health),
        a failing pass is reported and retried; the loop itself only stops when cancelled."""
        while True:
            await self.inputs.changed.wait()
            await asyncio.sleep(self.settings.recompute_debounce)
            self.inputs.changed.clear()
            if not self.inputs.synced:
                self.set_degraded("waiting for the k8s and identities buckets (initial values and watermarks)")
                continue
            try:
                await self._recompute_pass()
            except Exception as exc:  # noqa: BLE001 - a bug or a kernel hiccup: report, retry in a second
                log.exception("recompute failed")
                self.set_degraded(f"recompute failed: {exc}")
                asyncio.get_running_loop().call_later(RECOMPUTE_RETRY, self.inputs.changed.set)
            await self._publish_ipcache()

    async def _recompute_pass(self) -> None:
        """Desired state -> reconcilers; once every change was attempted, report the watermark it reflects."""
        watermark = self.inputs.watermark
        await self.recompute()
        self.ipcache.mark_synced()
        self.policies.mark_synced()
        rev_ip, rev_pol = self.ipcache.revision, self.policies.revision
        try:
            await self.ipcache.wait_until_reconciled(rev_ip, timeout=RECONCILE_WAIT)
            await self.policies.wait_until_reconciled(rev_pol, timeout=RECONCILE_WAIT)
        except asyncio.TimeoutError:  # the kernel is slow, not wrong: the reconcilers keep going
            self.set_degraded(f"changes not applied within {RECONCILE_WAIT:.0f}s; retrying")
            self.inputs.changed.set()
            return
        self.enforced_watermark = max(self.enforced_watermark, watermark)
        self.rt.progress["k8s_resource_version"] = str(self.enforced_watermark)
        self.rt.progress["endpoints"] = len(self.table.by_id)
        self.health = self.reconcile_health()

    def reconcile_health(self) -> Health:
        """OK, or what failed: ipcache rows, and endpoints (named by pod) whose policy is not enforced."""
        failed = self.policies.errors()
        if self.desired.policy_errors:
            failed = {**self.desired.policy_errors, **failed}
        self.rt.progress["endpoint_policy_failures"] = {self.endpoint_name(k): v for k, v in failed.items()}
        self.publish_endpoint_states()
        parts = []
        if failed:
            ep, why = next(iter(failed.items()))
            parts.append(f"{len(failed)} failed endpoint policies, last enforced state kept "
                         f"(e.g. {self.endpoint_name(ep)}: {why})")
        ipcache = self.ipcache.health()
        if ipcache.state is not State.OK:
            parts.append(ipcache.reason)
        return Health.degraded("; ".join(parts)) if parts else Health.ok()

    def publish_endpoint_states(self) -> None:
        """Per endpoint: ready / regenerating / not-ready (why), for `propolis endpoint list`."""
        self.rt.progress[endpoint_state.PROGRESS_KEY] = endpoint_state.endpoint_states(
            self.table.by_id.values(), self.desired.policies, self.policies.status, self.desired.policy_errors)
        self.rt.progress[endpoint_state.POLICY_FAILURES_KEY] = endpoint_state.policy_failures(
            self.table.by_id.values(), self.desired.engine, {**self.desired.policy_errors, **self.policies.errors()})

    def endpoint_name(self, endpoint_id: int) -> str:
        ep = self.table.by_id.get(endpoint_id)
        return f"endpoint {endpoint_id} ({ep.namespace}/{ep.pod})" if ep else f"endpoint {endpoint_id}"

    async def recompute(self) -> None:
        for ep in self.table.by_id.values():
            record = self.inputs.endpoints.get((ep.namespace, ep.pod))
            if record is not None and record.identity and record.identity != ep.identity:
                ep.identity = record.identity
                self.dp.upsert_endpoint(endpoint_id=ep.endpoint_id, ip=ep.ip, identity=ep.identity,
                                        ifindex=ep.ifindex)
                self.table.save()
        self.desired.update(self.inputs, list(self.table.by_id.values()))
        self.ipcache.replace_all(self.desired.ipcache)
        self.policies.replace_all({ep_id: pol for ep_id, pol in self.desired.policies.items()})
        self.publish_endpoint_states()
        l7_pending = sum(p.l7_pending for p in self.desired.policies.values())
        self.rt.features["L7 proxy"] = {
            "state": "Disabled",
            "detail": (f"{l7_pending} endpoint(s) have L7 rules: their L4 ports are allowed, HTTP/Kafka/DNS rules "
                       "are not enforced yet" if l7_pending else "not built yet; no policy has L7 rules")}
        if self.desired.services_generation != self.services_written:
            diff = self.dp.set_services(self.desired.services)  # a diff of the LB maps
            self.services_written = self.desired.services_generation
            self.rt.progress["services"] = len(self.desired.services)
            if diff.enabled and self.desired.service_errors:
                self.rt.progress["service_errors"] = dict(self.desired.service_errors)
            else:
                self.rt.progress.pop("service_errors", None)

    async def _publish_ipcache(self) -> None:
        """Our endpoints' IP -> identity, for other nodes and clusters (our slice of the ipcache bucket)."""
        node = self.settings.node_name
        want = {subjects.ipcache_key(node, ep.ip): IpcacheRecord(ip=ep.ip, prefix_len=32, identity=ep.identity,
                                                                 node=node)
                for ep in self.table.by_id.values() if ep.identity and ep.ip}
        try:
            for key in [k for k in self.published if k not in want]:
                await self.ipcache_kv.delete(key)
                del self.published[key]
            for key, rec in want.items():
                if self.published.get(key) != rec:
                    await self.ipcache_kv.put(key, rec)
                    self.published[key] = rec
        except Exception as exc:  # NATS away: next recompute retries
            log.warning("publishing ipcache entries failed: %s", exc)


def build(settings: Settings) -> list[Component]:
    datapath = DatapathComponent(settings)
    inputs = InputsComponent()
    return [datapath, inputs, Enforcer(settings, datapath, inputs)]


def main(argv: list[str] | None = None) -> int:
    return run_service(SERVICE, Settings, build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
