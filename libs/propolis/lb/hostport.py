"""HostPort as Cilium's kube-proxy replacement implements it: an LB frontend of type HostPort.

A pod's `containers[].ports[].hostPort` becomes, on the pod's own node only, one frontend per node
address (or the port's `hostIP` when one is given and is not 0.0.0.0) with the hostPort and protocol,
whose one backend is the pod's IP and containerPort (Cilium's `genServiceMappings` for pods; its
service name is `<pod>/host-port/<hostPort>`). The per-packet path handles it like a NodePort frontend
(`SVC_FLAG_HOSTPORT` in bpf/lib/lb.h, accepted by nodeport.h on the node's device, and by the pod
path's service lookup for pods of the node).

Conflicts: two pods of one node claiming one address:hostPort/protocol — the pod that holds it keeps it
(`owners`, carried from one computation to the next), otherwise the earlier created; the later one is
not installed and is reported (`conflicts`: "Pod ns/name" -> why). A frontend a Service already uses
(a NodePort on the node's address) is kept by the Service and the pod is reported the same way.

Pure functions of the normalized Pod records (`propolis.k8s.kinds.norm_pod`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from propolis.bus.messages import K8sObject
from propolis.lb.desired import PROTOCOLS, Backend, LBService

FRONTEND_TYPE = "HostPort"
Frontend = tuple[str, int, str]  # (ip, port, protocol)


@dataclass
class HostPorts:
    services: list[LBService] = field(default_factory=list)
    #: "Pod ns/name" -> why one of its hostPorts is not installed
    conflicts: dict[str, str] = field(default_factory=dict)
    #: frontend -> (namespace, pod) that holds it (hand back as `owners` next time)
    owners: dict[Frontend, tuple[str, str]] = field(default_factory=dict)


def _ipv4(value: object) -> str | None:
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ValueError:
        return None


def _pod_ip(pod: K8sObject) -> str | None:
    status = pod.status or {}
    for ip in [status.get("podIP"), *(status.get("podIPs") or [])]:
        if ip and _ipv4(ip):
            return _ipv4(ip)
    return None


def signature(pod: K8sObject | None) -> tuple[object, ...]:
    """What of a pod HostPort depends on: a pod change that keeps it costs no LB work."""
    if pod is None:
        return ()
    ports = tuple((p.get("hostPort"), p.get("hostIP") or "", p.get("containerPort"), p.get("protocol") or "TCP")
                  for c in (pod.fields or {}).get("containers") or [] for p in c.get("ports") or [] if p.get("hostPort"))
    if not ports:
        return ()
    status = pod.status or {}
    return ((pod.fields or {}).get("nodeName"), bool((pod.fields or {}).get("hostNetwork")), _pod_ip(pod),
            bool(status.get("terminating")), status.get("phase"), ports)


def _order(pod: K8sObject) -> tuple[str, int, str, str]:
    try:
        rv = int(pod.resource_version)
    except (TypeError, ValueError):
        rv = 0
    return (str((pod.status or {}).get("created") or ""), rv, pod.namespace, pod.name)


def desired_hostports(pods: Iterable[K8sObject], *, node_name: str, node_ips: Sequence[str],
                      taken: Iterable[Frontend] = (),
                      owners: Mapping[Frontend, tuple[str, str]] | None = None) -> HostPorts:
    """The HostPort frontends of node `node_name` (addresses `node_ips`); `taken`: frontends Services use."""
    owners = owners or {}
    addrs = [ip for ip in (_ipv4(a) for a in node_ips) if ip]
    claims: dict[Frontend, list[tuple[K8sObject, LBService]]] = {}
    for pod in pods:
        spec, status = pod.fields or {}, pod.status or {}
        if spec.get("nodeName") != node_name or spec.get("hostNetwork") or status.get("terminating") \
                or status.get("phase") in ("Succeeded", "Failed"):
            continue
        pod_ip = _pod_ip(pod)
        if not pod_ip:
            continue
        for c in spec.get("containers") or []:
            for p in c.get("ports") or []:
                host_port, container_port = p.get("hostPort"), p.get("containerPort")
                protocol = p.get("protocol") or "TCP"
                if not isinstance(host_port, int) or not 0 < host_port < 65536 or protocol not in PROTOCOLS:
                    continue
                if not isinstance(container_port, int) or not 0 < container_port < 65536:
                    continue
                host_ip = p.get("hostIP") or ""
                if host_ip and host_ip != "0.0.0.0":
                    ip = _ipv4(host_ip)
                    frontend_ips = [ip] if ip else []
                else:
                    frontend_ips = addrs
                backend = Backend(pod_ip, container_port, protocol, node_name=node_name)
                for ip in frontend_ips:
                    svc = LBService(pod.namespace, f"{pod.name}/host-port/{host_port}", p.get("name") or "",
                                    FRONTEND_TYPE, ip, host_port, protocol, (backend,))
                    claims.setdefault(svc.frontend, []).append((pod, svc))

    out = HostPorts()
    taken_set = set(taken)
    for frontend, claimants in sorted(claims.items()):
        holder = owners.get(frontend)
        claimants.sort(key=lambda c: (0 if (c[0].namespace, c[0].name) == holder else 1, _order(c[0])))
        label = f"hostPort {frontend[0]}:{frontend[1]}/{frontend[2]}"
        if frontend in taken_set:
            for pod, _ in claimants:
                out.conflicts[f"Pod {pod.namespace}/{pod.name}"] = f"{label} is a Service's frontend"
            continue
        winner, svc = claimants[0]
        for pod, _ in claimants[1:]:
            if (pod.namespace, pod.name) != (winner.namespace, winner.name):
                out.conflicts[f"Pod {pod.namespace}/{pod.name}"] = \
                    f"{label} already used by pod {winner.namespace}/{winner.name}"
        out.services.append(svc)
        out.owners[frontend] = (winner.namespace, winner.name)
    return out


__all__ = ["FRONTEND_TYPE", "HostPorts", "desired_hostports", "signature"]
