"""The l7-proxy service's components (wiring in services/l7_proxy/main.py).

* `PolicyInputsComponent` — follows the k8s and identities buckets (as the datapath-writer does)
  and the ipcache bucket (addresses -> identities), into a `ProxyPolicy`.
* `ProxyComponent` — installs the node's proxy route, opens the transparent listeners in the node
  namespace (`l7.redirect`), serves them (`l7.proxy.HTTPProxy`) and publishes L7 flows on the
  node's access-log subject for its Hubble observer. Ready once the policy inputs are synced:
  before that every request is denied (fail closed), never forwarded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from typing import Any

from propolis.bus import subjects
from propolis.l7.flows import publish_flow
from propolis.l7.kafka_proxy import KafkaProxy
from propolis.l7.policy import ProxyPolicy
from propolis.l7.proxy import HTTPProxy
from propolis.l7.redirect import prepare_node
from propolis.policy.proxy_ports import PROXY_PORTS
from propolis.runtime.component import Component
from propolis.runtime.netns import socket_in
from propolis.runtime.service import Runtime

log = logging.getLogger("propolis.l7.service")

SERVICE = "l7-proxy"


class PolicyInputsComponent(Component):
    name, title = "inputs", "watch the k8s, identities and ipcache buckets"

    def __init__(self, node: str, *, cluster_name: str, mode: str) -> None:
        super().__init__()
        self.policy = ProxyPolicy(node, cluster_name=cluster_name, mode=mode)

    async def start(self, rt: Runtime) -> None:
        k8s = await rt.bus.kv(subjects.K8S_BUCKET)
        ids = await rt.bus.kv(subjects.IDENTITIES_BUCKET)
        ipcache = await rt.bus.kv(subjects.IPCACHE_BUCKET)
        rt.spawn("inputs", self.policy.inputs.follow(k8s, ids, node=self.policy.node), self)
        rt.spawn("ipcache", self._ipcache(ipcache), self)
        self.set_ok()

    async def _ipcache(self, kv: Any) -> None:
        async for ev in kv.watch(">"):
            self.policy.ipcache_event(ev)


class ProxyComponent(Component):
    name, title = "proxy", "transparent HTTP listeners: every request judged by the L7 rules"

    def __init__(self, inputs: PolicyInputsComponent, *, node: str, netns: str | None,
                 header_timeout: float, idle_timeout: float) -> None:
        super().__init__(inputs)
        self.inputs, self.node, self.netns = inputs, node, netns
        self.header_timeout, self.idle_timeout = header_timeout, idle_timeout
        self.proxy: HTTPProxy | None = None
        self.kafka: KafkaProxy | None = None  # the Kafka listeners (port rules with rules.kafka)
        self._rt: Runtime | None = None

    def _socket(self) -> socket.socket:
        if self.netns:
            return socket_in(self.netns, socket.AF_INET, socket.SOCK_STREAM)
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    def _publish(self, flow: dict[str, Any]) -> None:
        if self._rt is not None:
            publish_flow(self._rt, self.node, flow)

    async def start(self, rt: Runtime) -> None:
        self._rt = rt
        await asyncio.to_thread(prepare_node, self.netns)
        self.proxy = HTTPProxy(self.inputs.policy, node=self.node, make_socket=self._socket, on_flow=self._publish,
                               header_timeout=self.header_timeout, idle_timeout=self.idle_timeout)
        await self.proxy.start()
        self.kafka = KafkaProxy(self.inputs.policy, node=self.node, make_socket=self._socket, on_flow=self._publish,
                                frame_timeout=self.header_timeout, idle_timeout=self.idle_timeout)
        await self.kafka.start()
        rt.spawn("readiness", self._readiness(rt), self)
        self.set_degraded("waiting for the policy inputs (every request denied meanwhile)")

    async def _readiness(self, rt: Runtime) -> None:
        while True:
            proxy = self.proxy
            assert proxy is not None
            if self.inputs.policy.ready:
                self.set_ok()
            rt.progress["l7_proxy"] = {
                "listeners": {f"{family}/{direction}": port for (family, direction), port in PROXY_PORTS.items()},
                "connections": proxy.stats.connections, "active": proxy.stats.active,
                "requests_forwarded": proxy.stats.requests_forwarded,
                "requests_denied": proxy.stats.requests_denied, "errors": dict(proxy.stats.errors)}
            if self.kafka is not None:
                rt.progress["l7_proxy"]["kafka"] = dataclasses.asdict(self.kafka.stats)
            servers = len(proxy.servers) + (len(self.kafka.servers) if self.kafka else 0)
            active = proxy.stats.active + (self.kafka.stats.active if self.kafka else 0)
            rt.features["L7 proxy"] = {"state": "Ok" if self.inputs.policy.ready else "Warning",
                                       "detail": f"HTTP, Kafka, {servers} listeners, {active} connections"}
            await asyncio.sleep(1.0)

    async def stop(self) -> None:
        if self.proxy is not None:
            await self.proxy.stop()
        if self.kafka is not None:
            await self.kafka.stop()
