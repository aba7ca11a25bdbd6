"""The cluster's health in one document: services (from heartbeats), NATS, Kubernetes, features.

`propolis status` prints it; ``-o json`` gives it to machines. A service
instance whose last heartbeat is older than ``stale_after`` counts as
unhealthy, and so does an expected service with no instance at all. Feature
states come from the services that own them (their heartbeat ``features``),
checked against what the kernel can do (`kernel_probe`), never assumed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from propolis import deploy
from propolis.bus import subjects
from propolis.bus.connection import Bus
from propolis.bus.messages import Heartbeat, K8sObject
from propolis.kernel_probe import probe_all

#: Features `propolis status` always lists, in Cilium's words; a service that owns one reports it.
FEATURES = ("KubeProxyReplacement", "Policy enforcement", "Hubble", "Encryption", "BandwidthManager",
            "Host firewall", "Cluster Mesh")


@dataclass
class StatusReport:
    healthy: bool = True
    problems: list[str] = field(default_factory=list)
    nats: dict[str, Any] = field(default_factory=dict)
    kubernetes: dict[str, Any] = field(default_factory=dict)
    services: list[dict[str, Any]] = field(default_factory=list)
    features: dict[str, dict[str, Any]] = field(default_factory=dict)
    kernel: dict[str, dict[str, Any]] = field(default_factory=dict)

    def problem(self, text: str) -> None:
        self.healthy = False
        self.problems.append(text)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("healthy", "problems", "nats", "kubernetes", "services",
                                              "features", "kernel")}


async def collect(bus: Bus, *, stale_after: float = 10.0, probe_kernel: bool = True) -> StatusReport:
    rep = StatusReport()
    nc = bus.nc
    info = await bus.js.account_info()
    rep.nats = {"url": bus.url, "connected": nc.is_connected, "server_version": nc.connected_server_version and
                str(nc.connected_server_version), "jetstream": {"streams": info.streams, "consumers": info.consumers,
                                                               "storage_bytes": info.storage, "memory_bytes": info.memory}}
    heartbeats: list[Heartbeat] = []
    try:
        hb_kv = await bus.kv(subjects.HEARTBEATS_BUCKET)
        heartbeats = [e.value for e in (await hb_kv.items()).values() if isinstance(e.value, Heartbeat)]
    except Exception as exc:
        rep.problem(f"heartbeats bucket unreadable: {exc}")
    nodes: list[str] = []
    try:
        k8s_kv = await bus.kv(subjects.K8S_BUCKET)
        nodes = sorted(e.value.name for e in (await k8s_kv.items("nodes.>")).values() if isinstance(e.value, K8sObject))
    except Exception:
        pass
    now = time.time()
    for hb in sorted(heartbeats, key=lambda h: (h.service, h.node)):
        age = now - hb.sent_at
        health = hb.health if age <= stale_after else "unhealthy"
        reasons = [f"{k}: {v.get('reason')}" for k, v in hb.components.items() if v.get("state") != "ok"]
        if age > stale_after:
            reasons.insert(0, f"no heartbeat for {age:.0f}s")
        rep.services.append({"service": hb.service, "node": hb.node, "instance": hb.instance, "version": hb.version,
                             "uptime_s": round(now - hb.started_at, 1), "health": health, "reasons": reasons,
                             "progress": hb.progress, "http": hb.http})
        if health != "ok":
            rep.problem(f"{hb.service} on {hb.node}: {health} ({'; '.join(reasons) or 'no reason given'})")
        for name, state in hb.features.items():
            rep.features.setdefault(name, {"source": hb.service, **(state if isinstance(state, dict)
                                                                     else {"state": state})})
    live = {(s["service"], s["node"]) for s in rep.services if s["health"] != "unhealthy"}
    for spec in deploy.SERVICES:
        expected_nodes = nodes if spec.scope == "node" and nodes else [None]
        for node in expected_nodes:
            if not any(svc == spec.name and (node is None or n == node) for svc, n in live):
                rep.problem(f"{spec.name}{' on ' + node if node else ''}: not running")
    watcher = [s for s in rep.services if s["service"] == "k8s-watcher"]
    rep.kubernetes = {"nodes": nodes, "watchers": len(watcher),
                      "resource_version": max((s["progress"].get("k8s_resource_version", "0") for s in watcher),
                                              default="0", key=lambda v: int(v or 0))}
    for name in FEATURES:
        rep.features.setdefault(name, {"state": "Disabled", "reason": "no running service provides it yet"})
    if probe_kernel:
        rep.kernel = {f.name: {"available": f.available, "detail": f.detail} for f in probe_all()}
    return rep
