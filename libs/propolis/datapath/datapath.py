"""Datapath: the one object the datapath-writer uses to drive a node's BPF programs and maps.

Why one facade: the writer reconciles desired state (endpoints, policy rows, ipcache) into
the kernel; it needs idempotent, diffing, restart-safe operations, not map plumbing.
* `load()` compiles bpf_lxc.c once per node (in a thread; a restart with the same build
  adopts the pinned programs instead) and adopts the node's pinned maps; nothing is flushed, so a restarted
  writer keeps conntrack, policy and endpoints, and the programs already attached keep enforcing while it
  starts (fail closed).
* `attach_endpoint` = policy map ensured + cilium_lxc entry + tc attach (milliseconds).
* `set_policy` diffs one endpoint's policy map; `set_ipcache` diffs the ipcache.
* `set_services` diffs the service LB maps (kube-proxy replacement, propolis.lb for the
  desired state); `attach_netdev` puts cil_from_netdev (NodePort) and cil_to_netdev
  (encryption.strictMode) on the node's underlay.
* `remove_all()` detaches everything and removes every pin of the node (tests, teardown).
State is inspectable with `propolis bpf … --node NODE`.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from propolis.datapath.loader import (
    PROGRAM_FROM_CONTAINER,
    PROGRAM_FROM_NETDEV,
    PROGRAM_TO_CONTAINER,
    PROGRAM_TO_NETDEV,
    LoadedPrograms,
    compile_programs,
    node_specs,
)
from propolis.datapath.services import LB_ALGORITHMS, ServiceDiff, ServiceMaps, ServiceView, read_services
from propolis.datapath.socket_lb import SocketLbAttacher
from propolis.datapath.tc import InterfaceGone, TcAttacher
from propolis.errors import PermanentError, ValidationError
from propolis.lb.desired import LBService
from propolis.maps import bpf, config, conntrack, endpoints, events, ipcache, metrics, policy, sizing
from propolis.maps import lb as lbmaps
from propolis.maps.conntrack import CtRow, GcResult
from propolis.maps.spec import default_pin_dir
from propolis.model.identity import RESERVED_HOST

MAX_ENDPOINT_ID = 65535


@dataclass
class AttachResult:
    """What attach_endpoint did, with its cost (for `bench` and logs)."""

    endpoint_id: int
    ifindex: int
    seconds: float
    created_policy_map: bool


@dataclass
class _EndpointState:
    ip: str
    ifindex: int
    netns: str | None


@dataclass
class DatapathSettings:
    """Per-node datapath settings (Cilium Helm names in comments)."""

    monitor_aggregation: str = "medium"    # bpf.monitorAggregation: none|low|medium|maximum
    drop_events: bool = True                # bpf.events.drop.enabled
    policy_verdict_events: bool = True      # bpf.events.policyVerdict.enabled
    trace_events: bool = True               # bpf.events.trace.enabled
    events_rate_limit: int = 0              # bpf.events.default.rateLimit, per endpoint here (0 = none)
    events_burst_limit: int = 0             # bpf.events.default.burstLimit (0 = the rate)
    map_dynamic_size_ratio: float = 0.0     # bpf.mapDynamicSizeRatio: CT/NAT sized from memory (0 = fixed sizes)
    maglev_table_size: int = lbmaps.MAGLEV_TABLE_SIZE  # maglev.tableSize (prime; Cilium's default 16381)
    kube_proxy_replacement: bool = True     # kubeProxyReplacement: false = services left to kube-proxy
    lb_algorithm: str = "random"            # loadBalancer.algorithm: random|maglev
    encryption_strict_mode_cidr: str = ""   # encryption.strictMode.cidr when strictMode.enabled ("" = off)
    encryption_strict_mode_allow_remote_node_identities: bool = False  # encryption.strictMode.allowRemoteNodeIdentities

    def __post_init__(self) -> None:
        if self.lb_algorithm not in LB_ALGORITHMS:
            raise ValidationError("lb_algorithm", f"{self.lb_algorithm!r} not in {list(LB_ALGORITHMS)}")
        if self.monitor_aggregation not in config.MONITOR_AGGREGATION:
            raise ValidationError("monitor_aggregation",
                                  f"{self.monitor_aggregation!r} not in {sorted(config.MONITOR_AGGREGATION)}")
        sizing.dynamic_sizes(self.map_dynamic_size_ratio)  # validates the ratio
        lbmaps.maglev_spec(self.maglev_table_size)  # validates M
        if self.encryption_strict_mode_cidr:
            config.strict_cidr(self.encryption_strict_mode_cidr)

    @property
    def map_sizes(self) -> dict[str, int]:
        """max_entries of the maps sized from memory (pin name -> entries; {} = fixed sizes)."""
        return sizing.dynamic_sizes(self.map_dynamic_size_ratio)


class Datapath:
    """The BPF datapath of one node: programs compiled once, maps pinned under `pin_dir`.

    `netns` is the node's network namespace (name under /run/netns or a path; None = the
    current one) where the lxc interfaces live; attach_endpoint may override it.
    Map operations are synchronous syscalls (microseconds each); netlink ones are async.
    """

    def __init__(self, node: str, pin_dir: str | None = None, *, netns: str | None = None,
                 settings: DatapathSettings | None = None) -> None:
        if not node or "/" in node:
            raise ValidationError("node", f"{node!r} is not a usable node name")
        self.node = node
        self.pin_dir = pin_dir or default_pin_dir(node)
        self.netns = netns
        self.settings = settings or DatapathSettings()
        self.programs: LoadedPrograms | None = None
        self._tc = TcAttacher()
        self.removed_on_reattach: list[int] = []  # endpoints whose interface was gone at reattach_all()
        self._maps: dict[str, bpf.BpfMap[Any, Any]] = {}
        self._endpoints: dict[int, _EndpointState] = {}
        # what this process last wrote to each policy map (it is the only writer): diffs
        # then cost no map dump; unknown after a restart, so the first diff reads the map
        self._policy_rows: dict[int, dict[policy.PolicyRowKey, policy.PolicyRowValue]] = {}
        self.attach_seconds: list[float] = []
        self._services: ServiceMaps | None = None
        self._netdevs: dict[int, str | None] = {}  # ifindex -> netns of interfaces with cil_from_netdev

    # ------------------------------------------------------------------ lifecycle
    @property
    def compile_seconds(self) -> float:
        """Time load() took to get programs: a bcc compile (~1.2 s) or adopting pins (~1 ms)."""
        return self.programs.compile_seconds if self.programs else 0.0

    async def load(self) -> None:
        """Adopt this build's pinned programs or compile them (in a worker thread), then open
        the pinned maps. Nothing is flushed: safe to call on a restart under traffic."""
        if self.programs is None:
            self._loaded(await asyncio.to_thread(compile_programs, self.node, self.pin_dir,
                                                 sizes=self.settings.map_sizes,
                                                 maglev_table_size=self.settings.maglev_table_size))

    def load_sync(self) -> None:
        """`load()` for code without an event loop (tests, tools)."""
        if self.programs is None:
            self._loaded(compile_programs(self.node, self.pin_dir, sizes=self.settings.map_sizes,
                                          maglev_table_size=self.settings.maglev_table_size))

    def _loaded(self, programs: LoadedPrograms) -> None:
        self.programs = programs
        self._open_maps()
        self.apply_settings(self.settings)
        for entry in endpoints.dump(self._map(endpoints.SPEC.pin_name)):
            if not entry.flags & endpoints.ENDPOINT_F_HOST:  # the host endpoint has no lxc to re-attach
                self._endpoints[entry.endpoint_id] = _EndpointState(entry.ip, entry.ifindex, self.netns)

    def _open_maps(self) -> None:
        for spec in (*node_specs(maglev_table_size=self.settings.maglev_table_size), *lbmaps.NETDEV_SPECS):
            if spec.map_type == bpf.BPF_MAP_TYPE_RINGBUF:
                continue
            self._maps[spec.pin_name] = spec.open(self.pin_dir)

    def _map(self, pin_name: str) -> bpf.BpfMap[Any, Any]:
        try:
            return self._maps[pin_name]
        except KeyError:
            raise PermanentError(f"datapath of node {self.node} is not loaded (call load())") from None

    async def close(self) -> None:
        """Release this process's handles; programs stay attached and maps pinned."""
        await self._tc.close()
        for bpf_map in self._maps.values():
            bpf_map.close()
        self._maps.clear()
        self._services = None
        if self.programs is not None:
            self.programs.close()
            self.programs = None

    def apply_settings(self, settings: DatapathSettings) -> None:
        self.settings = settings
        value = config.make_value(monitor_aggregation=settings.monitor_aggregation,
                                  drop_events=settings.drop_events,
                                  policy_verdict_events=settings.policy_verdict_events,
                                  trace_events=settings.trace_events,
                                  events_rate_limit=settings.events_rate_limit,
                                  events_burst_limit=settings.events_burst_limit,
                                  strict_mode_cidr=settings.encryption_strict_mode_cidr,
                                  strict_allow_remote_node_identities=(
                                      settings.encryption_strict_mode_allow_remote_node_identities))
        self._map(config.SPEC.pin_name).update(ctypes.c_uint32(0), value)

    # ------------------------------------------------------------------ endpoints
    def _programs(self) -> LoadedPrograms:
        if self.programs is None:
            raise PermanentError(f"datapath of node {self.node} is not loaded (call load())")
        return self.programs

    def _ensure_policy_map(self, endpoint_id: int) -> bool:
        """Create (or re-adopt) the endpoint's pinned policy map and point the outer map at it."""
        path = os.path.join(self.pin_dir, policy.inner_pin_name(endpoint_id))
        created = False
        try:
            fd = bpf.obj_get(path)
        except FileNotFoundError:
            spec = policy.INNER_SPEC
            fd = bpf.create_map(spec.map_type, ctypes.sizeof(spec.key_type), ctypes.sizeof(spec.value_type),
                                spec.max_entries, bpf.BPF_F_NO_PREALLOC, name=f"policy_{endpoint_id:05d}")
            bpf.obj_pin(fd, path)
            created = True
            self._policy_rows[endpoint_id] = {}
        try:
            outer = self._map(policy.OUTER_SPEC.pin_name)
            inner_id = bpf.obj_info(fd).id
            current = outer.lookup(ctypes.c_uint32(endpoint_id))
            if current is None or current.value != inner_id:
                outer.update(ctypes.c_uint32(endpoint_id), ctypes.c_uint32(fd))
        finally:
            os.close(fd)
        return created

    async def prepare_endpoints(self, endpoint_ids: Iterable[int]) -> int:
        """Create the policy maps of endpoint ids about to be used, ahead of their pods.

        Why: putting a map into cilium_ep_to_policy waits for an RCU grace period in the
        kernel (~8 ms here); a prepared id makes attach_endpoint skip it. Runs in a worker
        thread; prepared but unused maps are empty and harmless. Returns how many it created.
        """
        ids = [i for i in endpoint_ids if 0 < i <= MAX_ENDPOINT_ID]
        return sum(await asyncio.to_thread(lambda: [self._ensure_policy_map(i) for i in ids]))

    def _policy_map(self, endpoint_id: int) -> bpf.BpfMap[Any, Any]:
        path = os.path.join(self.pin_dir, policy.inner_pin_name(endpoint_id))
        try:
            return bpf.BpfMap.open_pinned(path, policy.PolicyKey, policy.PolicyValue)
        except FileNotFoundError:
            raise PermanentError(f"endpoint {endpoint_id} has no policy map on node {self.node} "
                                 "(attach_endpoint first)") from None

    def upsert_endpoint(self, *, endpoint_id: int, ip: str, identity: int, ifindex: int,
                        ingress_enforced: bool | None = None, egress_enforced: bool | None = None) -> bool:
        """Map half of attach_endpoint: policy map ensured + cilium_lxc entry written.

        Also the way to change an endpoint's identity (labels changed). Enforcement None =
        keep what the endpoint has, else True (fail closed until set_enforcement).
        Returns True when the policy map was created (False: adopted).
        """
        if not 0 < endpoint_id <= MAX_ENDPOINT_ID:
            raise ValidationError("endpoint_id", f"{endpoint_id} not in 1..{MAX_ENDPOINT_ID}")
        if not 0 < identity < 2**32:
            raise ValidationError("identity", f"{identity} is not a valid identity")
        try:
            key = endpoints.make_key(ip)
        except (OSError, ValueError):
            raise ValidationError("ip", f"{ip!r} is not an IPv4 address") from None
        lxc = self._map(endpoints.SPEC.pin_name)
        existing = lxc.lookup(key)
        if existing is not None and existing.lxc_id != endpoint_id:
            raise ValidationError("ip", f"{ip} already belongs to endpoint {existing.lxc_id}")
        created = self._ensure_policy_map(endpoint_id)
        if existing is None:  # a new endpoint on this address inherits no flow of an earlier one
            self.scrub_conntrack(ip)
        old = endpoints.decode(key, existing) if existing is not None else None
        entry = endpoints.EndpointEntry(
            ip=ip, endpoint_id=endpoint_id, identity=identity, ifindex=ifindex,
            ingress_enforced=ingress_enforced if ingress_enforced is not None else (old.ingress_enforced if old else True),
            egress_enforced=egress_enforced if egress_enforced is not None else (old.egress_enforced if old else True),
            flags=old.flags if old else 0, policy_audit=old.policy_audit if old else False)
        lxc.update(key, endpoints.make_value(entry))
        state = self._endpoints.get(endpoint_id)
        self._endpoints[endpoint_id] = _EndpointState(ip, ifindex, state.netns if state else self.netns)
        return created

    async def attach_endpoint(self, *, endpoint_id: int, ip: str, identity: int,
                              ifname: str | None = None, ifindex: int | None = None,
                              netns: str | None = None, ingress_enforced: bool | None = None,
                              egress_enforced: bool | None = None) -> AttachResult:
        """Make a pod's veth enforce: policy map, cilium_lxc entry, tc programs. Idempotent.

        The lxc interface is `ifname` or `ifindex` in `netns` (default: the node's).
        Enforcement None = keep what the endpoint has (restart), else True (fail closed
        until set_enforcement says otherwise).
        """
        started = time.perf_counter()
        programs = self._programs()
        netns = netns if netns is not None else self.netns
        if ifindex is None:
            if not ifname:
                raise ValidationError("ifname", "give ifname or ifindex")
            ifindex = await self._tc.ifindex_of(netns, ifname)
        created = self.upsert_endpoint(endpoint_id=endpoint_id, ip=ip, identity=identity, ifindex=ifindex,
                                       ingress_enforced=ingress_enforced, egress_enforced=egress_enforced)
        await self._tc.attach(netns, ifindex,
                              from_container=(programs.from_container_fd, PROGRAM_FROM_CONTAINER),
                              to_container=(programs.to_container_fd, PROGRAM_TO_CONTAINER))
        self._endpoints[endpoint_id] = _EndpointState(ip, ifindex, netns)
        elapsed = time.perf_counter() - started
        self.attach_seconds.append(elapsed)
        return AttachResult(endpoint_id, ifindex, elapsed, created)

    async def detach_endpoint(self, endpoint_id: int, *, netns: str | None = None) -> None:
        """Remove a pod's programs, endpoint entry, conntrack entries and policy map. Missing parts are fine."""
        state = self._endpoints.pop(endpoint_id, None)
        self._policy_rows.pop(endpoint_id, None)
        lxc = self._map(endpoints.SPEC.pin_name)
        if state is None:  # not known to this process: find it in the map
            for entry in endpoints.dump(lxc):
                if entry.endpoint_id == endpoint_id:
                    state = _EndpointState(entry.ip, entry.ifindex, self.netns)
        if state is not None:
            await self._tc.detach(netns if netns is not None else state.netns, state.ifindex)
            lxc.delete(endpoints.make_key(state.ip))
            self.scrub_conntrack(state.ip)
        self.remove_policy_map(endpoint_id)

    def remove_policy_map(self, endpoint_id: int) -> None:
        """Unhook and unpin one endpoint's policy map (missing is fine)."""
        self._policy_rows.pop(endpoint_id, None)
        self._map(policy.OUTER_SPEC.pin_name).delete(ctypes.c_uint32(endpoint_id))
        try:
            os.unlink(os.path.join(self.pin_dir, policy.inner_pin_name(endpoint_id)))
        except FileNotFoundError:
            pass

    async def reattach_all(self) -> int:
        """Point every known endpoint's filters at this process's programs (after an upgrade).

        Atomic per interface (tc replace). Returns how many endpoints were re-attached.
        An endpoint whose interface is gone (its pod was deleted while no writer answered the CNI
        DEL) is removed instead, like Cilium drops endpoints it cannot restore: failing here made
        every later start fail the same way, and the node never got a working writer again.
        Their ids are in ``removed_on_reattach``.
        """
        programs = self._programs()
        count = 0
        self.removed_on_reattach = []
        for endpoint_id, state in list(self._endpoints.items()):
            try:
                await self._tc.attach(state.netns, state.ifindex,
                                      from_container=(programs.from_container_fd, PROGRAM_FROM_CONTAINER),
                                      to_container=(programs.to_container_fd, PROGRAM_TO_CONTAINER))
            except InterfaceGone:
                await self.detach_endpoint(endpoint_id, netns=state.netns)
                self.removed_on_reattach.append(endpoint_id)
                continue
            count += 1
        return count

    def list_endpoints(self) -> list[endpoints.EndpointEntry]:
        return endpoints.dump(self._map(endpoints.SPEC.pin_name))

    def set_enforcement(self, endpoint_id: int, *, ingress: bool, egress: bool, audit: bool = False) -> None:
        """Turn default-deny on/off per direction and policy audit mode for one endpoint (one map write)."""
        lxc = self._map(endpoints.SPEC.pin_name)
        for key, value in lxc.items():
            if value.lxc_id == endpoint_id:
                entry = endpoints.decode(key, value)
                lxc.update(key, endpoints.make_value(endpoints.EndpointEntry(
                    entry.ip, entry.endpoint_id, entry.identity, entry.ifindex, ingress, egress, entry.flags,
                    policy_audit=audit)))
                return
        raise PermanentError(f"endpoint {endpoint_id} is not attached on node {self.node}")

    # ------------------------------------------------------------------ host endpoint (hostFirewall)
    def set_host_endpoint(self, ip: str, ifindex: int) -> bool:
        """The node as an endpoint (Cilium's host endpoint, bpf/lib/host_firewall.h): its InternalIP in
        cilium_lxc with ENDPOINT_F_HOST and a policy map. A new row starts NOT enforced: locking the node out
        of its own bus is worse than a few milliseconds open; `set_enforcement` follows with its policy. A
        previous address of the node is dropped. Returns True when the row was created."""
        lxc = self._map(endpoints.SPEC.pin_name)
        key = endpoints.make_key(ip)
        existing = lxc.lookup(key)
        if existing is not None and existing.lxc_id != endpoints.HOST_ENDPOINT_ID:
            raise ValidationError("ip", f"node address {ip} already belongs to endpoint {existing.lxc_id}")
        for entry in self.list_endpoints():
            if entry.endpoint_id == endpoints.HOST_ENDPOINT_ID and entry.ip != ip:
                lxc.delete(endpoints.make_key(entry.ip))
        self._ensure_policy_map(endpoints.HOST_ENDPOINT_ID)
        old = endpoints.decode(key, existing) if existing is not None else None
        lxc.update(key, endpoints.make_value(endpoints.EndpointEntry(
            ip, endpoints.HOST_ENDPOINT_ID, RESERVED_HOST, ifindex,
            ingress_enforced=bool(old and old.ingress_enforced), egress_enforced=bool(old and old.egress_enforced),
            flags=endpoints.ENDPOINT_F_HOST, policy_audit=bool(old and old.policy_audit))))
        return existing is None

    def remove_host_endpoint(self) -> None:
        """Host firewall off: the node's row and policy map go (missing is fine)."""
        lxc = self._map(endpoints.SPEC.pin_name)
        for entry in self.list_endpoints():
            if entry.endpoint_id == endpoints.HOST_ENDPOINT_ID:
                lxc.delete(endpoints.make_key(entry.ip))
        self.remove_policy_map(endpoints.HOST_ENDPOINT_ID)

    # ------------------------------------------------------------------ policy
    def set_policy(self, endpoint_id: int, entries: Iterable[policy.PolicyEntryLike], *,
                   reread: bool = False) -> policy.PolicyDiff:
        """Make the endpoint's policy map hold exactly `entries` (diff, not rewrite).

        The diff is against what this process last wrote, or with `reread` against the map itself
        (the reconciler's periodic refresh: a row deleted by hand comes back)."""
        desired = policy.compute_rows(entries)
        if len(desired) > policy.INNER_SPEC.max_entries:
            raise ValidationError("entries", f"{len(desired)} rows exceed the policy map size "
                                  f"{policy.INNER_SPEC.max_entries}")
        known = self._policy_rows.pop(endpoint_id, None)
        if reread:
            known = None
        with self._policy_map(endpoint_id) as bpf_map:
            diff = policy.apply_rows(bpf_map, desired, actual=known)
        self._policy_rows[endpoint_id] = desired
        return diff

    def get_policy(self, endpoint_id: int) -> dict[policy.PolicyRowKey, tuple[policy.PolicyRowValue, int, int]]:
        with self._policy_map(endpoint_id) as bpf_map:
            return policy.read_rows(bpf_map)

    # ------------------------------------------------------------------ ipcache
    def set_ipcache(self, entries: Iterable[ipcache.IPCacheEntry]) -> policy.PolicyDiff:
        """Make cilium_ipcache hold exactly `entries` (diff; stale rows deleted last)."""
        bpf_map = self._map(ipcache.SPEC.pin_name)
        desired = {e.cidr: e for e in (x.normalized() for x in entries)}
        actual = {e.cidr: e for e in ipcache.dump(bpf_map)}
        diff = policy.PolicyDiff()
        for cidr, entry in desired.items():
            if actual.get(cidr) != entry:
                bpf_map.update(ipcache.make_key(cidr), ipcache.make_value(entry))
                if cidr in actual:
                    diff.updated += 1
                else:
                    diff.added += 1
        for cidr in actual.keys() - desired.keys():
            diff.deleted += bpf_map.delete(ipcache.make_key(cidr))
        return diff

    def upsert_ipcache(self, entries: Iterable[ipcache.IPCacheEntry]) -> None:
        bpf_map = self._map(ipcache.SPEC.pin_name)
        for entry in entries:
            entry = entry.normalized()
            bpf_map.update(ipcache.make_key(entry.cidr), ipcache.make_value(entry))

    def delete_ipcache(self, cidrs: Iterable[str]) -> int:
        bpf_map = self._map(ipcache.SPEC.pin_name)
        return sum(bpf_map.delete(ipcache.make_key(c)) for c in cidrs)

    def list_ipcache(self) -> list[ipcache.IPCacheEntry]:
        return ipcache.dump(self._map(ipcache.SPEC.pin_name))

    # ------------------------------------------------------------------ services
    def set_services(self, services: Iterable[LBService]) -> ServiceDiff:
        """Make the service LB maps hold exactly `services` (diff; batch map operations).

        `services` is `propolis.lb.desired_services(...)` for this node. With
        settings.kube_proxy_replacement False the maps are emptied instead and packets to
        service addresses pass untranslated (kube-proxy's rules handle them): the switch
        costs one call. Synchronous: ~µs per changed service, no thread needed.
        """
        if self._services is None:
            self._services = ServiceMaps(self._maps, algorithm=self.settings.lb_algorithm,
                                         maglev_table_size=self.settings.maglev_table_size)
            self._map(lbmaps.SERVICES_SPEC.pin_name)  # not loaded -> PermanentError
        if self._services.algorithm != self.settings.lb_algorithm:
            self._services.algorithm = self.settings.lb_algorithm
        enabled = self.settings.kube_proxy_replacement
        diff = self._services.apply(services if enabled else ())
        diff.enabled = enabled
        return diff

    def update_services(self, upserts: Iterable[LBService],
                        removed: Iterable[tuple[str, int, str]] = ()) -> ServiceDiff:
        """Incremental form of set_services for one event: `upserts` replace their frontends,
        `removed` frontends ((ip, port, protocol)) go; the rest is not even looked at, so the
        cost does not grow with the node's number of services. Needs one set_services first
        (after a start the writer does a full sync anyway)."""
        if self._services is None:
            raise PermanentError("call set_services (full sync) before update_services")
        if not self.settings.kube_proxy_replacement:
            return ServiceDiff(enabled=False)
        return self._services.update(upserts, removed)

    def resync_services(self, services: Iterable[LBService]) -> ServiceDiff:
        """`set_services` diffing against the maps as they are, not this process's last write
        (the reconciler's periodic refresh: an entry deleted by hand comes back)."""
        if self._services is not None:
            self._services.forget()
        return self.set_services(services)

    def policy_map_ids(self) -> list[int]:
        """Endpoint ids that have a pinned policy map (read from bpffs, not from a cache)."""
        prefix, _, suffix = policy.INNER_SPEC.pin_name.partition("{endpoint_id")
        suffix = suffix.partition("}")[2]
        ids = []
        for name in os.listdir(self.pin_dir):
            if name.startswith(prefix) and name.endswith(suffix):
                number = name[len(prefix):len(name) - len(suffix)]
                if number.isdigit():
                    ids.append(int(number))
        return ids

    def list_services(self) -> list[ServiceView]:
        return read_services(self._map(lbmaps.SERVICES_SPEC.pin_name), self._map(lbmaps.BACKENDS_SPEC.pin_name))

    async def attach_netdev(self, ifname: str, *, netns: str | None = None) -> int:
        """Put the node's underlay programs (Cilium: bpf_host.c on the native devices) on the node's
        underlay interface, as the settings need them: cil_from_netdev (NodePort, externalIPs, LB IPs) on
        tc ingress with kube-proxy replacement, cil_to_netdev (encryption.strictMode) on tc egress.
        Returns its ifindex."""
        programs = self._programs()
        netns = netns if netns is not None else self.netns
        ifindex = await self._tc.ifindex_of(netns, ifname)
        if self.settings.kube_proxy_replacement:
            await self._tc.attach_ingress(netns, ifindex, (programs.from_netdev_fd, PROGRAM_FROM_NETDEV))
        if self.settings.encryption_strict_mode_cidr:
            await self._tc.attach_egress(netns, ifindex, (programs.to_netdev_fd, PROGRAM_TO_NETDEV))
        self._netdevs[ifindex] = netns
        return ifindex

    async def attach_host_firewall(self, ifname: str, *, netns: str | None = None) -> int:
        """hostFirewall: bpf_host.c on both directions of the node's underlay interface (ingress = to the
        node, after NodePort; egress = from the node, which also tracks the node's own connections so their
        replies pass). Returns its ifindex (the host endpoint's interface)."""
        programs = self._programs()
        netns = netns if netns is not None else self.netns
        ifindex = await self._tc.ifindex_of(netns, ifname)
        await self._tc.attach_ingress(netns, ifindex, (programs.from_netdev_fd, PROGRAM_FROM_NETDEV))
        await self._tc.attach_egress(netns, ifindex, (programs.to_netdev_fd, PROGRAM_TO_NETDEV))
        self._netdevs[ifindex] = netns
        return ifindex

    async def detach_netdev(self, ifindex: int) -> None:
        netns = self._netdevs.pop(ifindex, self.netns)
        await self._tc.detach(netns, ifindex)

    # ------------------------------------------------------------------ observability
    def events(self) -> events.EventReader:
        """A reader of this node's event ring buffer (one consumer per node)."""
        return events.EventReader(self.pin_dir)

    def metrics(self) -> list[metrics.MetricsRow]:
        return metrics.dump(self._map(metrics.SPEC.pin_name))

    def conntrack(self) -> list[CtRow]:
        return (conntrack.dump(self._map(conntrack.TCP_SPEC.pin_name))
                + conntrack.dump(self._map(conntrack.ANY_SPEC.pin_name)))

    def scrub_conntrack(self, ip: str) -> int:
        """Delete every conntrack entry (both maps, service entries too) with `ip` at either end.

        Why: entries outlive their endpoint, and lookups key on addresses only, so a new pod that
        gets a deleted pod's IP would inherit its ESTABLISHED flows and skip policy for a reused
        tuple. Cilium scrubs on endpoint delete and create; so do detach_endpoint and
        upsert_endpoint (for an address new to cilium_lxc). Batch syscalls, keys scanned in C.
        """
        removed = 0
        for spec in (conntrack.TCP_SPEC, conntrack.ANY_SPEC):
            ct = self._map(spec.pin_name)
            doomed = [key for raw_keys, _, _ in lbmaps.raw_batches(ct) for key in conntrack.keys_naming(raw_keys, ip)]
            if doomed:
                lbmaps.delete_batch(ct, b"".join(doomed), len(doomed))
            removed += len(doomed)
        return removed

    def ct_gc(self) -> int:
        return sum(r.deleted for r in self.ct_gc_report())

    def ct_gc_report(self) -> list[GcResult]:
        """One GC pass over both conntrack maps: per map what was deleted, what stays, its size."""
        results = []
        for spec in (conntrack.TCP_SPEC, conntrack.ANY_SPEC):
            ct = self._map(spec.pin_name)
            deleted, alive = conntrack.gc_counts(ct)
            results.append(conntrack.GcResult(spec.pin_name, "TCP" if spec is conntrack.TCP_SPEC else "non-TCP",
                                              deleted, alive, ct.info().max_entries))
        return results

    def ct_flush(self) -> int:
        """Delete every conntrack entry (`cilium bpf ct flush global`): open flows are re-evaluated
        by policy at their next packet. Returns how many entries went."""
        return sum(conntrack.flush(self._map(spec.pin_name)) for spec in (conntrack.TCP_SPEC, conntrack.ANY_SPEC))

    # ------------------------------------------------------------------ teardown
    async def remove_all(self) -> None:
        """Detach every endpoint of the node and delete every pin and the pin dir."""
        lxc_path = endpoints.SPEC.path(self.pin_dir)
        if os.path.exists(lxc_path):
            with endpoints.SPEC.open(self.pin_dir) as lxc:
                for entry in endpoints.dump(lxc):
                    state = self._endpoints.pop(entry.endpoint_id, None)
                    await self._tc.detach(state.netns if state else self.netns, entry.ifindex)
        for state in self._endpoints.values():
            await self._tc.detach(state.netns, state.ifindex)
        self._endpoints.clear()
        for ifindex, netns in list(self._netdevs.items()):
            await self._tc.detach(netns, ifindex)
        self._netdevs.clear()
        sock_links = SocketLbAttacher(self.pin_dir)
        for program in sock_links.attached():  # detached now, even if a link fd is still open somewhere
            sock_links.detach(program)
        await self.close()
        remove_pins(self.pin_dir)


def remove_pins(pin_dir: str) -> None:
    """Unlink every pin under a node's pin dir and the dir itself (maps die with their users)."""
    if not os.path.isdir(pin_dir):
        return
    for name in os.listdir(pin_dir):
        path = os.path.join(pin_dir, name)
        if os.path.isdir(path):
            remove_pins(path)
        else:
            os.unlink(path)
    os.rmdir(pin_dir)
    parent = os.path.dirname(pin_dir.rstrip("/"))
    if os.path.basename(parent) == "propolis":
        try:
            os.rmdir(parent)  # the last node of this machine is gone: leave bpffs as we found it
        except OSError:
            pass  # other nodes' pins remain
