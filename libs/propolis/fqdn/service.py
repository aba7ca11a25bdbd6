"""The dns-proxy service's components (wiring in services/dns_proxy/main.py).

* `DnsInputsComponent` — the k8s, identities and ipcache buckets, as the l7-proxy follows them, into
  a `DnsPolicy` (which DNS rules apply to a redirected query).
* `FqdnCacheComponent` — the node's FQDN cache (`fqdn.cache`), kept in its own key of
  `PROPOLIS_FQDN_V1` (`<node>`) so a restart restores it; the node's datapath-writer compiles
  toFQDNs selectors against it and reports the generation its maps reflect (heartbeat progress
  `fqdn_generation`): `learn` returns only once the new IPs are allowed.
* `DnsProxyComponent` — the proxy route, the transparent UDP/TCP listeners on the DNS proxy port
  in the node namespace (`fqdn.listener`) and the decision core (`fqdn.proxy.DnsProxy`). Before the
  policy inputs are synced no query has rules, so redirected DNS is dropped (fail closed); while
  this process is down nothing listens and the datapath drops it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

from propolis.bus import subjects
from propolis.bus.kv import EventType
from propolis.bus.kv_target import KvTarget
from propolis.bus.messages import FqdnCacheRecord, Heartbeat
from propolis.fqdn.cache import FqdnCache
from propolis.fqdn.listener import DnsListeners, UdpUpstream
from propolis.fqdn.policy import DNS_PROXY_PORT, DnsPolicy
from propolis.fqdn.proxy import DnsProxy, Learned, Observation
from propolis.l7.flows import dns_flow, publish_flow
from propolis.l7.redirect import prepare_node
from propolis.l7.service import PolicyInputsComponent
from propolis.maps import conntrack
from propolis.reconcile import ReconciledComponent, Reconciler
from propolis.runtime.component import Component
from propolis.runtime.netns import socket_in
from propolis.runtime.service import Runtime

log = logging.getLogger("propolis.fqdn.service")

SERVICE = "dns-proxy"
WRITER = "datapath-writer"
ENFORCED_WAIT_S = 5.0  # a learn gives up waiting for the writer after this (the answer left long before)
EXPIRY_INTERVAL_S = 1.0
REFRESH_INTERVAL_S = 10.0  # the node's record is compared with the bucket this often (a purge is repaired)


class DnsInputsComponent(PolicyInputsComponent):
    title = "watch the k8s, identities and ipcache buckets (the DNS rules of each endpoint)"

    def __init__(self, node: str, *, cluster_name: str, mode: str) -> None:
        super().__init__(node, cluster_name=cluster_name, mode=mode)
        self.policy: DnsPolicy = DnsPolicy(node, cluster_name=cluster_name, mode=mode)


def live_addresses(pin_dir: str) -> set[str]:
    """Addresses of the node's unexpired conntrack entries (both tables): a learned IP among them is still in
    use, so it stays past its TTL as a zombie (Cilium's DNSZombieMappings). No maps pinned = none."""
    found: set[str] = set()
    for spec in (conntrack.TCP_SPEC, conntrack.ANY_SPEC):
        try:
            with spec.open(pin_dir) as bpf_map:
                found.update(a for row in conntrack.dump(bpf_map) if row.expires_in > 0 for a in (row.src, row.dst))
        except OSError:
            continue
    return found


class FqdnCacheComponent(ReconciledComponent):
    name, title = "fqdn-cache", "learned names -> IPs in PROPOLIS_FQDN_V1 <node>, enforced by the writer"

    def __init__(self, node: str, *, pin_dir: str, min_ttl: int, max_ips_per_hostname: int,
                 idle_connection_grace_s: float) -> None:
        super().__init__()
        self.node, self.pin_dir = node, pin_dir
        self.cache = FqdnCache(min_ttl=min_ttl, max_ips_per_hostname=max_ips_per_hostname,
                               idle_connection_grace_s=idle_connection_grace_s)
        self.generation = 0  # of the last record published
        self.enforced = 0  # the generation the node's datapath-writer reports its maps reflect
        self.dirty = False  # TTLs refreshed since the last publish (persisted on the next expiry pass)
        self.reconciler: Reconciler[str, FqdnCacheRecord] | None = None
        self._enforced_moved: asyncio.Event | None = None

    async def start(self, rt: Runtime) -> None:
        self._enforced_moved = asyncio.Event()
        kv = await rt.bus.kv(subjects.FQDN_BUCKET)
        self.reconciler = Reconciler("fqdn-cache", KvTarget(kv, subjects.fqdn_key(self.node)),
                                     refresh_interval=REFRESH_INTERVAL_S)
        entry = await kv.get(subjects.fqdn_key(self.node))
        if entry is not None and isinstance(entry.value, FqdnCacheRecord):
            self.cache.restore(entry.value.entries)
            self.generation = entry.value.generation
            self.reconciler.upsert(subjects.fqdn_key(self.node), entry.value)  # desired as restored: not pruned
            log.info("FQDN cache restored: %d entries, generation %d", len(self.cache.dump()), self.generation)
        self.reconciler.mark_synced()  # the node's record is all this target owns, and it was just read
        rt.spawn("fqdn-record", self.reconciler.run(), self)
        heartbeats = await rt.bus.kv(subjects.HEARTBEATS_BUCKET)
        rt.spawn("writer-progress", self._follow_writer(heartbeats), self)
        rt.spawn("expiry", self._expire_loop(), self)
        self.set_ok()

    async def _follow_writer(self, kv: Any) -> None:
        async for ev in kv.watch(subjects.heartbeat_keys(WRITER, self.node)):
            if ev.type is EventType.PUT and isinstance(ev.value, Heartbeat):
                seen = ev.value.progress.get("fqdn_generation")
                if isinstance(seen, int) and seen > self.enforced:
                    self.enforced = seen
                    assert self._enforced_moved is not None
                    self._enforced_moved.set()

    def publish(self) -> int:
        """The cache as the desired record under the next generation (the reconciler writes it, retrying
        while NATS is away; meanwhile the writer keeps the last); returns that generation."""
        assert self.reconciler is not None, "publish before start"
        self.generation += 1
        self.dirty = False
        self.reconciler.upsert(subjects.fqdn_key(self.node),
                               FqdnCacheRecord(self.node, self.generation, self.cache.to_json()))
        return self.generation

    async def learn(self, item: Learned) -> None:
        """Record an answer; new IPs are published and awaited until the writer's maps allow them."""
        if not self.cache.update(item.name, item.ips, item.ttl, time.time()):
            self.dirty = True
            return
        generation = self.publish()
        deadline = time.monotonic() + ENFORCED_WAIT_S
        assert self._enforced_moved is not None
        while self.enforced < generation and time.monotonic() < deadline:
            self._enforced_moved.clear()
            try:
                await asyncio.wait_for(self._enforced_moved.wait(), deadline - time.monotonic())
            except TimeoutError:
                break

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL_S)
            now = time.time()
            expiring = any(e.expires_at <= now for e in self.cache.dump())
            live = await asyncio.to_thread(live_addresses, self.pin_dir) if expiring else set()
            self.cache.expire(now, alive=live.__contains__)
            if expiring or self.dirty:  # removed entries, or zombies marked (kept across a restart too)
                self.publish()


class DnsProxyComponent(Component):
    name, title = "proxy", "transparent DNS listeners: every query judged by the endpoint's DNS rules"

    def __init__(self, inputs: DnsInputsComponent, cache: FqdnCacheComponent, *, node: str, netns: str | None,
                 reject: str, max_delay_s: float) -> None:
        super().__init__(inputs, cache)
        self.inputs, self.cache, self.node, self.netns = inputs, cache, node, netns
        self.upstream = UdpUpstream(self._socket)
        self.proxy = DnsProxy(inputs.policy.dns_rules, self.upstream.exchange, cache.learn,
                              inputs.policy.fqdn_selectors, reject=reject, max_delay_s=max_delay_s,
                              observe=self._observe)
        self._rt: Runtime | None = None
        self.listeners = DnsListeners(self.proxy, self._socket, DNS_PROXY_PORT)

    def _socket(self, family: int, kind: int) -> socket.socket:
        return socket_in(self.netns, family, kind) if self.netns else socket.socket(family, kind)

    def _observe(self, seen: Observation) -> None:
        """Each query and answer as a Hubble DNS flow, to the node's observer."""
        if self._rt is None:
            return
        where, policy = seen.where, self.inputs.policy
        publish_flow(self._rt, self.node, dns_flow(
            node=self.node, client=(where.client_ip, where.client_port), server=(where.server_ip, where.server_port),
            client_identity=policy.identity_of(where.client_ip), server_identity=policy.identity_of(where.server_ip),
            transport=where.protocol, query=seen.query, qtypes=seen.qtypes, verdict=seen.verdict, rcode=seen.rcode,
            ips=seen.ips, ttl=seen.ttl, latency_ns=seen.latency_ns))

    async def start(self, rt: Runtime) -> None:
        self._rt = rt
        await asyncio.to_thread(prepare_node, self.netns)
        self.upstream.start()
        await self.listeners.start()
        rt.spawn("readiness", self._readiness(rt), self)
        rt.spawn("progress", self._progress(rt), self)
        self.set_degraded("waiting for the policy inputs (redirected DNS dropped meanwhile)")

    async def _progress(self, rt: Runtime) -> None:
        """The resourceVersion the DNS rules reflect, so `sandbox wait` covers this proxy too."""
        inputs = self.inputs.policy.inputs
        while True:
            await inputs.changed.wait()
            inputs.changed.clear()
            if inputs.synced:
                rt.progress["k8s_resource_version"] = str(inputs.watermark)

    async def _readiness(self, rt: Runtime) -> None:
        while True:
            ready = self.inputs.policy.ready
            if ready:
                self.set_ok()
            rt.progress["dns_proxy"] = {"port": DNS_PROXY_PORT, **self.proxy.stats,
                                        "overload_drops": self.listeners.overload_drops,
                                        "cache_entries": len(self.cache.cache.dump()),
                                        "fqdn_generation": self.cache.generation,
                                        "enforced_generation": self.cache.enforced}
            rt.features["DNS proxy"] = {"state": "Ok" if ready else "Warning",
                                        "detail": f"UDP/TCP {DNS_PROXY_PORT}, {self.proxy.stats['allowed']} allowed, "
                                                  f"{self.proxy.stats['denied']} denied"}
            await asyncio.sleep(1.0)

    async def stop(self) -> None:
        await self.listeners.stop()
        self.upstream.stop()
