"""Global services (Cilium's `service.cilium.io/global|shared|affinity` and the legacy `io.cilium/` aliases).

A Service with the same namespace and name in several clusters, annotated global, is load-balanced over the
ready backends of every cluster that shares it. Export: `cluster_service` (this cluster's backends, none when
not shared). Import: the datapath-writer hands each global Service's remote backends to `lb.desired_services`,
which picks per `affinity`: `local` uses this cluster's backends while one is active, else the remote ones;
`remote` the reverse; `none` (default) all of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from propolis.bus.messages import ClusterService, K8sObject

GLOBAL = ("service.cilium.io/global", "io.cilium/global-service")
SHARED = ("service.cilium.io/shared", "io.cilium/shared-service")
AFFINITY = ("service.cilium.io/affinity", "io.cilium/service-affinity")
AFFINITIES = ("local", "remote", "none")


def annotation(svc: K8sObject, names: tuple[str, ...]) -> str | None:
    annotations = svc.fields.get("annotations") or {}
    return next((str(annotations[n]) for n in names if n in annotations), None)


def is_global(svc: K8sObject) -> bool:
    return (annotation(svc, GLOBAL) or "").lower() == "true"


def is_shared(svc: K8sObject) -> bool:
    """Shared unless annotated "false" (Cilium's default)."""
    return (annotation(svc, SHARED) or "true").lower() != "false"


def affinity(svc: K8sObject) -> str:
    """local | remote | none; anything else counts as none."""
    value = (annotation(svc, AFFINITY) or "none").lower()
    return value if value in AFFINITIES else "none"


def port_key(port_name: str, protocol: str) -> str:
    return f"{port_name}/{protocol}"


def cluster_service(cluster: str, cluster_id: int, svc: K8sObject, slices: Iterable[K8sObject]) -> ClusterService:
    """What this cluster exports of a global Service: its ready IPv4 backends per port, if shared."""
    shared = is_shared(svc)
    backends: dict[str, list[list[Any]]] = {}
    for s in slices if shared else ():
        if s.fields.get("addressType", "IPv4") != "IPv4":
            continue
        for port in s.fields.get("ports") or []:
            if not isinstance(port.get("port"), int):
                continue
            rows = backends.setdefault(port_key(port.get("name") or "", port.get("protocol") or "TCP"), [])
            for ep in s.fields.get("endpoints") or []:
                conditions = ep.get("conditions") or {}
                if conditions.get("ready") is False or conditions.get("terminating"):
                    continue
                rows.extend([str(a), port["port"]] for a in ep.get("addresses") or [])
    for rows in backends.values():
        rows.sort()
    return ClusterService(cluster, svc.namespace, svc.name, shared, backends, cluster_id)


def choose(local: tuple[Any, ...], remote: tuple[Any, ...], affinity_: str, *, active: Any) -> tuple[Any, ...]:
    """The backends a global Service uses: the preferred side while it has an active backend, else the other
    (failover); `none` = both. ``active(backend)`` says whether one can take new connections."""
    if affinity_ == "local":
        return local if any(active(b) for b in local) else remote
    if affinity_ == "remote":
        return remote if any(active(b) for b in remote) else local
    return local + remote
