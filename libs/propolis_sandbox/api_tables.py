"""Server-side printing (`meta.k8s.io/v1` Table) so `kubectl get` shows the usual columns.

Why: kubectl asks the server for a Table (`Accept: …;as=Table;…`) and prints
its columns; without one it falls back to NAME and AGE only. The columns
follow kubectl's familiar output (pods: READY STATUS RESTARTS AGE, -o wide
adds IP and NODE; services: TYPE CLUSTER-IP EXTERNAL-IP PORT(S) …).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from propolis_sandbox.api_resources import Resource

Obj = dict[str, Any]
Column = tuple[str, str, int, Callable[[Obj], Any]]  # name, type, priority (1 = -o wide), cell


def human_age(timestamp: str | None) -> str:
    """kubectl's short duration (`45s`, `3m2s`, `17m`, `5h3m`, `21h`, `4d`)."""
    if not timestamp:
        return "<unknown>"
    try:
        then = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "<invalid>"
    s = max(int((datetime.now(UTC) - then).total_seconds()), 0)
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = m // 60
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    return f"{h // 24}d"


def _age(obj: Obj) -> str:
    return human_age(obj["metadata"].get("creationTimestamp"))


def _pod_ready(obj: Obj) -> str:
    containers = (obj.get("spec") or {}).get("containers") or []
    statuses = (obj.get("status") or {}).get("containerStatuses") or []
    return f"{sum(1 for c in statuses if c.get('ready'))}/{len(containers)}"


def _pod_status(obj: Obj) -> str:
    if obj["metadata"].get("deletionTimestamp"):
        return "Terminating"
    return (obj.get("status") or {}).get("phase") or "Unknown"


def _service_ports(obj: Obj) -> str:
    out = []
    for p in (obj.get("spec") or {}).get("ports") or []:
        number = f"{p.get('port')}:{p['nodePort']}" if p.get("nodePort") else str(p.get("port"))
        out.append(f"{number}/{p.get('protocol', 'TCP')}")
    return ",".join(out) or "<none>"


def _external_ip(obj: Obj) -> str:
    spec = obj.get("spec") or {}
    ingress = [i.get("ip") or i.get("hostname") for i in ((obj.get("status") or {}).get("loadBalancer") or {})
               .get("ingress") or []]
    ips = (spec.get("externalIPs") or []) + [i for i in ingress if i]
    if ips:
        return ",".join(ips)
    return "<pending>" if spec.get("type") == "LoadBalancer" else "<none>"


def _selector(selector: Obj | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((selector or {}).items())) or "<none>"


def _node_status(obj: Obj) -> str:
    ready = next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), None)
    return "Ready" if ready and ready.get("status") == "True" else "NotReady" if ready else "Unknown"


def _node_ip(obj: Obj) -> str:
    return next((a.get("address") for a in (obj.get("status") or {}).get("addresses") or []
                 if a.get("type") == "InternalIP"), "<none>")


def _slice_endpoints(obj: Obj) -> str:
    addresses = [a for e in obj.get("endpoints") or [] for a in e.get("addresses") or []]
    shown = ",".join(addresses[:3]) + (f" + {len(addresses) - 3} more..." if len(addresses) > 3 else "")
    return shown or "<unset>"


def _slice_ports(obj: Obj) -> str:
    return ",".join(str(p.get("port")) for p in obj.get("ports") or []) or "<unset>"


def _valid(obj: Obj) -> str:
    cond = next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == "Valid"), None)
    return str(cond.get("status")) if cond else ""


NAME: Column = ("Name", "string", 0, lambda o: o["metadata"]["name"])
AGE: Column = ("Age", "string", 0, _age)

COLUMNS: dict[str, list[Column]] = {
    "Pod": [NAME, ("Ready", "string", 0, _pod_ready), ("Status", "string", 0, _pod_status),
            ("Restarts", "string", 0, lambda o: "0"), AGE,
            ("IP", "string", 1, lambda o: (o.get("status") or {}).get("podIP") or "<none>"),
            ("Node", "string", 1, lambda o: (o.get("spec") or {}).get("nodeName") or "<none>")],
    "Service": [NAME, ("Type", "string", 0, lambda o: (o.get("spec") or {}).get("type", "ClusterIP")),
                ("Cluster-IP", "string", 0, lambda o: (o.get("spec") or {}).get("clusterIP") or "<none>"),
                ("External-IP", "string", 0, _external_ip), ("Port(s)", "string", 0, _service_ports), AGE,
                ("Selector", "string", 1, lambda o: _selector((o.get("spec") or {}).get("selector")))],
    "Node": [NAME, ("Status", "string", 0, _node_status), ("Roles", "string", 0, lambda o: "<none>"), AGE,
             ("Version", "string", 0, lambda o: ((o.get("status") or {}).get("nodeInfo") or {})
              .get("kubeletVersion", "")),
             ("Internal-IP", "string", 1, _node_ip),
             ("Pod-CIDR", "string", 1, lambda o: (o.get("spec") or {}).get("podCIDR") or "<none>")],
    "Namespace": [NAME, ("Status", "string", 0, lambda o: (o.get("status") or {}).get("phase", "")), AGE],
    "EndpointSlice": [NAME, ("AddressType", "string", 0, lambda o: o.get("addressType", "")),
                      ("Ports", "string", 0, _slice_ports), ("Endpoints", "string", 0, _slice_endpoints), AGE],
    "NetworkPolicy": [NAME, ("Pod-Selector", "string", 0,
                             lambda o: _selector(((o.get("spec") or {}).get("podSelector") or {})
                                                 .get("matchLabels"))), AGE],
    "CiliumNetworkPolicy": [NAME, AGE, ("Valid", "string", 0, _valid)],
    "CiliumClusterwideNetworkPolicy": [NAME, AGE, ("Valid", "string", 0, _valid)],
}


def wants_table(accept: str) -> bool:
    return "as=Table" in accept and "g=meta.k8s.io" in accept


def table(resource: Resource, items: list[Obj], resource_version: str, include_object: str = "Metadata") -> Obj:
    """A Table of `items`; each row carries the object (or its metadata, kubectl's default)."""
    columns = COLUMNS.get(resource.kind, [NAME, AGE])
    rows = []
    for obj in items:
        if include_object == "Object":
            row_object: Obj | None = obj
        elif include_object == "None":
            row_object = None
        else:
            row_object = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}
        rows.append({"cells": [cell(obj) for _, _, _, cell in columns], "object": row_object})
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": [{"name": name, "type": kind, "format": "name" if name == "Name" else "",
                                   "description": "", "priority": priority}
                                  for name, kind, priority, _ in columns],
            "rows": rows}
