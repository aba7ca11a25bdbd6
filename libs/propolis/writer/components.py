"""The datapath-writer's components (wired in services/datapath_writer/main.py): bus inputs + CNI
announcements -> this node's BPF maps and tc programs.

Components, in start order (each declares what it requires; `check_wiring` verifies the order):
1. datapath  — compile bpf_lxc.c once, adopt the node's pinned maps (nothing flushed: the
   programs already attached keep enforcing the last state while we start — fail closed),
   re-point every known endpoint's tc filters at the new programs (atomic replace).
2. inputs    — watch the k8s and identities buckets (ClusterInputs).
3. lb        — the node's Services -> LB maps (reconciler `lb-services`).
4. ipcache-publisher — our endpoints -> our slice of the ipcache bucket (reconciler over KV).
4b. bandwidth — pod bandwidth annotations -> a tbf per direction (reconciler `bandwidth`).
4c. socket-lb — bpf_sock.c's cgroup programs on the node's cgroup, hostNamespaceOnly (reconciler
   `socket-lb`; `bpf-lb-sock`, `cgroup-root`).
5. enforcer  — policy compute: desired ipcache and per-endpoint policy on every input change,
   reconciled into the maps (prune only after all inputs synced); hands Services to `lb` and
   endpoints to the publisher. Progress `k8s_resource_version` = the watermark the kernel state reflects.
6. endpoints — the CNI socket; ADD answers once the endpoint is programmed.
7. ct-gc     — conntrack GC on an interval that adapts to how full the tables are.
Every reconciler re-applies its desired state against the actual maps each
`reconcile-refresh-interval` (drift repair).

State: `propolis bpf endpoint list --node N`, `propolis bpf policy get EP --node N`,
`propolis bpf ipcache list --node N`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

from propolis.bandwidth.shaper import select_mode
from propolis.bus import codec, subjects
from propolis.bus.kv_target import KvTarget
from propolis.bus.messages import POLICY_FAILURES_KEY, EndpointConfig
from propolis.bus.messages import IpcacheEntry as IpcacheRecord
from propolis.datapath.datapath import Datapath, DatapathSettings
from propolis.datapath.pressure import MapPressureCollector
from propolis.datapath.socket_lb import SockAttachment, host_netns_cookie
from propolis.errors import TemporaryError, ValidationError
from propolis.kernel_probe import probe_all
from propolis.maps.endpoints import HOST_ENDPOINT_ID
from propolis.model.identity import RESERVED_INIT
from propolis.reconcile import ReconciledComponent, Reconciler
from propolis.runtime.component import Component
from propolis.runtime.health import Health, State
from propolis.runtime.service import Runtime
from propolis.writer import endpoint_config, endpoint_state, socket_lb
from propolis.writer.bandwidth import BandwidthTarget, PodBandwidth, desired_bandwidth
from propolis.writer.ct_gc import ConntrackGC
from propolis.writer.desired import DesiredState, node_internal_ip
from propolis.writer.endpoint_api import EndpointAnnouncement, EndpointApiServer
from propolis.writer.endpoints import EndpointTable, LocalEndpoint
from propolis.writer.inputs import ClusterInputs
from propolis.writer.ipcache_publisher import desired_records
from propolis.writer.settings import Settings
from propolis.writer.socket_lb import SocketLbTarget
from propolis.writer.targets import EndpointPolicyTarget, IpcacheTarget, ServicesTarget

log = logging.getLogger("propolis.datapath_writer")
SERVICE = "datapath-writer"
#: how long a recompute waits for its changes to be attempted before it reports and retries
RECONCILE_WAIT = 30.0
#: a recompute pass that raised is tried again after this long, even without a new input change
RECOMPUTE_RETRY = 1.0


class DatapathComponent(Component):
    name, title = "datapath", "compile bpf_lxc.c once, adopt pinned maps, re-attach known endpoints"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        if settings.host_firewall and not settings.devices.strip():
            raise ValidationError("devices", "the host firewall is enforced on the node's devices: name at least one")
        self.settings = settings
        self.host_ifindex = 0  # the device the host endpoint is on (hostFirewall)
        self.dp = Datapath(settings.node_name, settings.bpf_pin_dir or None, netns=settings.node_netns or None,
                           settings=DatapathSettings(kube_proxy_replacement=settings.kube_proxy_replacement,
                                                     lb_algorithm=settings.lb_algorithm,
                                                     map_dynamic_size_ratio=settings.map_dynamic_size_ratio,
                                                     events_rate_limit=settings.events_rate_limit,
                                                     events_burst_limit=settings.events_burst_limit,
                                                     maglev_table_size=settings.maglev_table_size,
                                                     encryption_strict_mode_cidr=(
                                                         settings.encryption_strict_mode_cidr
                                                         if settings.encryption_strict_mode_enabled else ""),
                                                     encryption_strict_mode_allow_remote_node_identities=(
                                                         settings.encryption_strict_mode_allow_remote_node_identities)))

    async def start(self, rt: Runtime) -> None:
        await self.dp.load()
        rt.registry.register(MapPressureCollector(self.dp))  # cilium_bpf_map_pressure{map_name}
        count = await self.dp.reattach_all()
        log.info("datapath loaded in %.2fs; %d endpoints re-attached", self.dp.compile_seconds, count)
        if self.dp.removed_on_reattach:
            log.warning("endpoints %s removed: their interfaces are gone (pods deleted while no writer ran)",
                        self.dp.removed_on_reattach)
        devices = [d.strip() for d in self.settings.devices.split(",") if d.strip()]
        if self.settings.kube_proxy_replacement or self.settings.encryption_strict_mode_enabled:
            for device in devices:
                await self.dp.attach_netdev(device)
        if self.settings.host_firewall:
            for device in devices:
                self.host_ifindex = await self.dp.attach_host_firewall(device)
            rt.features["Host firewall"] = {"state": "Enabled",
                                            "detail": f"host endpoint on {', '.join(devices) or 'no device'}"}
        else:
            rt.features["Host firewall"] = {"state": "Disabled", "detail": "hostFirewall.enabled=false: policies "
                                                                          "with a nodeSelector do nothing"}
        rt.progress["compile_seconds"] = round(self.dp.compile_seconds, 3)
        if self.settings.encryption_strict_mode_enabled:  # shown by `propolis encrypt status`
            rt.progress["encryption_strict_mode"] = {
                "cidr": self.settings.encryption_strict_mode_cidr, "devices": devices,
                "allow_remote_node_identities": self.settings.encryption_strict_mode_allow_remote_node_identities}
        rt.features["Policy enforcement"] = {
            "state": self.settings.policy_enforcement.capitalize(),
            "detail": "L3/L4 in eBPF on every pod veth" + ("; policyAuditMode: would-be drops are forwarded and "
                                                           "reported as AUDIT" if self.settings.policy_audit_mode else "")}
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
    name, title = "inputs", "watch the k8s and identities buckets, and this node's FQDN cache"

    def __init__(self, node: str = "") -> None:
        super().__init__()
        self.node = node
        self.inputs = ClusterInputs(fqdn_synced=False)

    async def start(self, rt: Runtime) -> None:
        k8s = await rt.bus.kv(subjects.K8S_BUCKET)
        ids = await rt.bus.kv(subjects.IDENTITIES_BUCKET)
        mesh = await rt.bus.kv(subjects.CLUSTERMESH_CACHE_BUCKET)  # remote clusters (empty without Cluster Mesh)
        fqdn = await rt.bus.kv(subjects.FQDN_BUCKET)  # the node's dns-proxy cache: what toFQDNs selects
        rt.spawn("inputs", self.inputs.follow(k8s, ids, mesh, node=self.node), self)
        rt.spawn("fqdn-cache", self._follow_fqdn(fqdn), self)

    async def _follow_fqdn(self, kv: Any) -> None:
        async for ev in kv.watch(subjects.fqdn_key(self.node)):
            self.inputs.apply_fqdn(ev)


class LoadBalancer(ReconciledComponent):
    name, title = "lb", "this node's Service frontends and backends -> the LB maps (kube-proxy replacement)"

    def __init__(self, settings: Settings, datapath: DatapathComponent) -> None:
        super().__init__(datapath)
        self.node = settings.node_name
        self.kube_proxy_replacement = settings.kube_proxy_replacement
        self.target = ServicesTarget(datapath.dp)
        self.reconciler: Reconciler[str, int] = Reconciler("lb-services", self.target,
                                                           refresh_interval=settings.reconcile_refresh_interval)
        self.generation = -1  # DesiredState.services_generation last handed to the reconciler

    def bind(self, desired: DesiredState, inputs: ClusterInputs) -> None:
        """Write `desired`'s frontend table; each periodic refresh first recomputes it from `inputs` in full."""
        self.target.table = desired.lb

        def recompute() -> None:
            if inputs.synced:  # a wiped bucket: keep the last state (fail closed)
                desired.recompute_services(inputs)
        self.target.recompute = recompute

    async def start(self, rt: Runtime) -> None:
        self.rt = rt
        rt.spawn("lb-reconciler", self.reconciler.run(), self)

    def set_services(self, desired: DesiredState) -> None:
        """The node's services, when they changed (pod and policy churn costs no LB work)."""
        if desired.services_generation == self.generation:
            return
        self.reconciler.upsert(self.node, desired.services_generation)
        self.generation = desired.services_generation
        self.rt.progress["services"] = len(desired.lb)
        if self.kube_proxy_replacement and desired.service_errors:
            self.rt.progress["service_errors"] = dict(desired.service_errors)
        else:
            self.rt.progress.pop("service_errors", None)


class IpcachePublisher(ReconciledComponent):
    name, title = "ipcache-publisher", "this node's endpoints -> its slice of the ipcache bucket"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.reconciler: Reconciler[str, IpcacheRecord] | None = None

    async def start(self, rt: Runtime) -> None:
        kv = await rt.bus.kv(subjects.IPCACHE_BUCKET)
        self.reconciler = Reconciler("ipcache-publisher", KvTarget(kv, subjects.ipcache_keys(self.settings.node_name)),
                                     refresh_interval=self.settings.reconcile_refresh_interval)
        rt.spawn("ipcache-publisher", self.reconciler.run(), self)

    def publish(self, endpoints: list[LocalEndpoint]) -> None:
        """Desired = every local endpoint with an identity; what a previous instance published for
        endpoints gone meanwhile is pruned (the bucket is read, not remembered)."""
        assert self.reconciler is not None, "publish before start"
        self.reconciler.replace_all(desired_records(self.settings.node_name, endpoints))
        self.reconciler.mark_synced()


class ConntrackGCComponent(Component):
    name, title = "ct-gc", "delete expired conntrack entries on an interval that adapts to table fill"

    def __init__(self, settings: Settings, datapath: DatapathComponent) -> None:
        super().__init__(datapath)
        self.datapath = datapath
        self.settings = settings
        self.gc: ConntrackGC | None = None

    async def start(self, rt: Runtime) -> None:
        self.gc = ConntrackGC(self.datapath.dp, rt.registry, interval=self.settings.conntrack_gc_interval,
                              max_interval=self.settings.conntrack_gc_max_interval)
        rt.progress["conntrack_gc"] = self.gc.status()
        rt.spawn("ct-gc", self._run(rt), self)

    async def _run(self, rt: Runtime) -> None:
        assert self.gc is not None
        gc_task = asyncio.ensure_future(self.gc.run())
        try:
            while not gc_task.done():  # the GC's figures in the heartbeat after each pass
                await asyncio.wait({gc_task}, timeout=min(self.gc.interval, 30.0))
                rt.progress["conntrack_gc"] = self.gc.status()
            gc_task.result()
        finally:
            gc_task.cancel()


class BandwidthManager(ReconciledComponent):
    name, title = "bandwidth", "pod bandwidth annotations -> a tbf per direction (Cilium's Bandwidth Manager)"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.enabled = settings.enable_bandwidth_manager
        self.target = BandwidthTarget(settings.node_netns or None)
        self.reconciler: Reconciler[str, PodBandwidth] = Reconciler(
            "bandwidth", self.target, refresh_interval=settings.reconcile_refresh_interval)

    async def start(self, rt: Runtime) -> None:
        """Disabled still runs the reconciler with nothing desired: shapers left from an enabled run go."""
        mode = select_mode(await asyncio.to_thread(probe_all))
        rt.features["BandwidthManager"] = (
            {"state": mode.name, "detail": mode.detail} if self.enabled else
            {"state": "Disabled", "detail": f"enable-bandwidth-manager=false (would use {mode.detail})"})
        rt.spawn("bandwidth-reconciler", self.reconciler.run(), self)

    def set_pods(self, inputs: ClusterInputs, endpoints: list[LocalEndpoint]) -> None:
        """Desired shapers from the mirrored pods of this node's endpoints (inputs are synced here)."""
        self.target.endpoints = endpoints
        self.reconciler.replace_all(desired_bandwidth(inputs.pods, endpoints) if self.enabled else {})
        self.reconciler.mark_synced()


class SocketLoadBalancer(ReconciledComponent):
    name, title = "socket-lb", "bpf_sock.c on the node's cgroup: Services for the node's own processes (socketLB)"

    def __init__(self, settings: Settings, datapath: DatapathComponent) -> None:
        super().__init__(datapath)
        self.settings = settings
        self.datapath = datapath
        self.reconciler: Reconciler[str, SockAttachment] = Reconciler(
            "socket-lb", SocketLbTarget(datapath.dp), refresh_interval=settings.reconcile_refresh_interval)

    async def start(self, rt: Runtime) -> None:
        """Disabled still runs the reconciler with nothing desired: links left from an enabled run go."""
        cookie = 0
        programs = self.datapath.dp.programs
        refused = programs.sock_error if programs is not None else "programs not loaded"
        if self.settings.bpf_lb_sock and refused:
            rt.features["Socket LB"] = {"state": "Disabled", "detail": refused}
        elif self.settings.bpf_lb_sock:
            cookie = await asyncio.to_thread(host_netns_cookie, self.settings.node_netns or None)
            rt.features["Socket LB"] = {"state": socket_lb.ENABLED_STATE,
                                        "detail": f"cgroup {self.settings.cgroup_root}; pods' sockets are left to "
                                                  "the per-packet path"}
        else:
            rt.features["Socket LB"] = {"state": "Disabled", "detail": "bpf-lb-sock=false: the node's own processes "
                                                                      "do not reach ClusterIPs"}
        self.reconciler.replace_all(socket_lb.desired_socket_lb(self.settings.bpf_lb_sock and not refused,
                                                                self.settings.cgroup_root, cookie))
        self.reconciler.mark_synced()
        rt.spawn("socket-lb-reconciler", self.reconciler.run(), self)


class Enforcer(Component):
    name, title = "enforcer", "policy compute: desired ipcache and per-endpoint policy -> their maps"

    def __init__(self, settings: Settings, datapath: DatapathComponent, inputs: InputsComponent,
                 lb: LoadBalancer, publisher: IpcachePublisher, bandwidth: BandwidthManager) -> None:
        super().__init__(datapath, inputs, lb, publisher, bandwidth)
        self.bandwidth = bandwidth
        self.settings = settings
        self.dp = datapath.dp
        self.inputs = inputs.inputs
        self.lb = lb
        self.publisher = publisher
        self.table = EndpointTable(Path(settings.datapath_socket).with_name(f"endpoints-{settings.node_name}.json"))
        self.datapath = datapath
        self.host_ip = ""  # the node address the host endpoint has (hostFirewall)
        self.host_options = endpoint_config.HostEndpointOptions(
            Path(settings.datapath_socket).with_name(f"host-endpoint-{settings.node_name}.json"))
        self.desired = DesiredState(node=settings.node_name, mode=settings.policy_enforcement,
                                    cluster_name=settings.cluster_name,
                                    allow_localhost=settings.allow_localhost == "always",
                                    default_local_cluster=settings.policy_default_local_cluster and settings.cluster_id > 0,
                                    policy_audit_mode=settings.policy_audit_mode,
                                    host_firewall=settings.host_firewall)
        refresh = settings.reconcile_refresh_interval
        self.ipcache = Reconciler("ipcache", IpcacheTarget(self.dp), refresh_interval=refresh)
        lb.bind(self.desired, self.inputs)
        self.policies = Reconciler("endpoint-policy", EndpointPolicyTarget(self.dp), refresh_interval=refresh)
        self.enforced_watermark = 0

    async def start(self, rt: Runtime) -> None:
        self.rt = rt
        self.table.load()
        self.host_options.load()
        self.desired.host_audit_mode = self.host_options.policy_audit_mode
        known = {e.endpoint_id for e in self.dp.list_endpoints()}
        for ep_id in [i for i in self.table.by_id if i not in known]:
            self.table.remove(ep_id)  # its pinned entry is gone (node rebooted): forget it
        # CIDR identities keep the numbers the kernel already uses (no renumbering across a restart)
        self.desired.engine.adopt_cidr_identities({e.cidr: e.identity for e in self.dp.list_ipcache()})
        rt.spawn("ipcache-reconciler", self.ipcache.run(), self)
        rt.spawn("policy-reconciler", self.policies.run(), self)
        rt.spawn("recompute", self._recompute_loop(), self)

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
            except Exception as exc:  # a bug or a kernel hiccup: report, retry in a second
                log.exception("recompute failed")
                self.set_degraded(f"recompute failed: {exc}")
                asyncio.get_running_loop().call_later(RECOMPUTE_RETRY, self.inputs.changed.set)
            self.publisher.publish(list(self.table.by_id.values()))

    async def _recompute_pass(self) -> None:
        """Desired state -> reconcilers; once every change was attempted, report the watermark it reflects."""
        watermark = self.inputs.watermark
        fqdn_generation = self.inputs.fqdn_generation
        await self.recompute()
        revisions = [(r, r.revision) for r in (self.ipcache, self.policies, self.lb.reconciler,
                                               self.bandwidth.reconciler)]
        try:
            for reconciler, revision in revisions:
                reconciler.mark_synced()
                await reconciler.wait_until_reconciled(revision, timeout=RECONCILE_WAIT)
        except TimeoutError:  # the kernel is slow, not wrong: the reconcilers keep going
            self.set_degraded(f"changes not applied within {RECONCILE_WAIT:.0f}s; retrying")
            self.inputs.changed.set()
            return
        self.enforced_watermark = max(self.enforced_watermark, watermark)
        self.rt.progress["k8s_resource_version"] = str(self.enforced_watermark)
        self.rt.progress["fqdn_generation"] = fqdn_generation  # the dns-proxy releases answers on it
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
        self.rt.progress[POLICY_FAILURES_KEY] = endpoint_state.policy_failures(
            self.table.by_id.values(), self.desired.engine, {**self.desired.policy_errors, **self.policies.errors()})

    def sync_host_endpoint(self) -> None:
        """hostFirewall: the node's InternalIP (from its Node object) is the host endpoint's address; with the
        host firewall off, a host endpoint left by an earlier run goes."""
        if not self.settings.host_firewall:
            if self.host_ip != "-":
                self.dp.remove_host_endpoint()
                self.host_ip = "-"
            return
        own = self.inputs.nodes.get(self.settings.node_name)
        ip = node_internal_ip(own) if own is not None else None
        if ip and ip != self.host_ip:
            self.dp.set_host_endpoint(ip, self.datapath.host_ifindex)
            self.host_ip = ip

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
        self.desired.hand_ipcache_changes(self.ipcache)
        self.sync_host_endpoint()
        self.policies.replace_all({ep_id: pol for ep_id, pol in self.desired.policies.items()})
        self.publish_endpoint_states()
        l7_pending = sum(p.l7_pending for p in self.desired.policies.values())
        # "L7 proxy" itself is the l7-proxy's feature (HTTP); what no proxy enforces yet is said here
        self.rt.features["L7 rules without a proxy"] = {
            "state": "Disabled",
            "detail": (f"{l7_pending} endpoint(s) have L7 rules no proxy enforces (l7proto): their L4 ports are allowed, "
                       "the rules are not enforced yet" if l7_pending else "no policy has such L7 rules")}
        self.lb.set_services(self.desired)
        self.bandwidth.set_pods(self.inputs, list(self.table.by_id.values()))



class Endpoints(Component):
    name, title = "endpoints", "the CNI socket: ADD answers once the endpoint is programmed (fail closed)"

    def __init__(self, settings: Settings, datapath: DatapathComponent, inputs: InputsComponent,
                 enforcer: Enforcer) -> None:
        super().__init__(datapath, inputs, enforcer)
        self.settings = settings
        self.dp = datapath.dp
        self.inputs = inputs.inputs
        self.enforcer = enforcer
        self.table = enforcer.table
        self.policies = enforcer.policies
        self.desired = enforcer.desired
        self.api: EndpointApiServer | None = None
        self._config_sub: Any = None  # endpoint_config_subject: `propolis endpoint config`

    async def start(self, rt: Runtime) -> None:
        self.rt = rt
        self.api = EndpointApiServer(self.settings.datapath_socket, self.handle_cni)
        await self.api.start()
        self._config_sub = await rt.bus.subscribe(subjects.endpoint_config_subject(self.settings.node_name),
                                                  self.handle_config, expected=EndpointConfig)

    async def stop(self) -> None:
        if self.api is not None:
            await self.api.stop()

    async def handle_config(self, req: EndpointConfig, msg: Any) -> None:
        """`propolis endpoint config`: change a local endpoint's options (no pod named: the host endpoint's),
        answer once its map entry has them."""
        answer = EndpointConfig(req.namespace, req.pod)
        node = self.settings.node_name
        try:
            if req.namespace or req.pod:
                ep = self.table.find_pod(req.namespace, req.pod)
                if ep is None:
                    raise ValidationError("pod", f"{req.namespace}/{req.pod} is no endpoint of node {node}")
                holder: Any = ep
                endpoint_id, name, save = ep.endpoint_id, f"{ep.namespace}/{ep.pod}", self.table.save
                programmed = bool(ep.identity and ep.identity != RESERVED_INIT)
                policy_of = partial(self.desired.endpoint_policy, self.inputs, ep)
            else:
                if not self.settings.host_firewall:
                    raise ValidationError("endpoint", f"node {node} runs without hostFirewall: it has no host endpoint")
                holder = self.enforcer.host_options
                endpoint_id, name, save = HOST_ENDPOINT_ID, f"host of {node}", holder.save
                programmed = bool(self.enforcer.host_ip)
                policy_of = partial(self.desired.host_policy, self.inputs)
            if endpoint_config.apply_options(holder, req.options):
                save()
                self.desired.host_audit_mode = self.enforcer.host_options.policy_audit_mode
                log.info("endpoint %d (%s) options now %s", endpoint_id, name, endpoint_config.options_of(holder))
                if programmed:
                    failed = await self.policies.wait_until_reconciled(self.policies.upsert(endpoint_id, policy_of()),
                                                                       timeout=self.settings.identity_wait)
                    if endpoint_id in failed:
                        raise TemporaryError(f"endpoint {endpoint_id} ({name}): {failed[endpoint_id]}")
                self.inputs.changed.set()
            answer.options = endpoint_config.options_of(holder)
        except (TimeoutError, ValidationError, TemporaryError) as exc:
            answer.error = str(exc) or type(exc).__name__
        if msg.reply:
            await msg.respond(codec.encode(answer))

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
                               host_ifname=req.host_ifname, netns=req.netns, ifname=req.ifname)
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
            except TimeoutError:
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
            except TimeoutError:
                pass
