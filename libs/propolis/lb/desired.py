"""Desired service load-balancing state of one node, from Services and EndpointSlices.

Why per node: externalTrafficPolicy / internalTrafficPolicy `Local` mean "only backends on
this node", so every node's maps hold its own view and the BPF program needs no scope
logic. Pure functions of the normalized records (`propolis.k8s.kinds.norm_service`,
`norm_endpointslice` in `K8sObject.fields`), so the datapath-writer can call them on every
change and diff the result into the maps (`Datapath.set_services`).

Semantics follow kube-proxy / Cilium:
* one `LBService` per frontend (ClusterIP:port, each node IP:nodePort, externalIPs,
  LoadBalancer ingress IPs) and protocol; headless (`clusterIP: None`) and ExternalName
  services have none.
* endpoints: ready (and not terminating) -> active; terminating -> `terminating` (keeps
  established flows, gets no new ones); not ready -> left out, unless
  `publishNotReadyAddresses`. Missing conditions count as ready (the API's rule).
* ports: a Service port meets the EndpointSlice port with the same name and protocol, so
  named targetPorts are already resolved by the slice controller.
* `sessionAffinity: ClientIP` with `sessionAffinityConfig.clientIP.timeoutSeconds`
  (default 10800).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from propolis.bus.messages import K8sObject
from propolis.errors import ValidationError
from propolis.lb import global_services

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
DEFAULT_AFFINITY_TIMEOUT = 10800  # Kubernetes' default for ClientIP affinity
BACKEND_ACTIVE = "active"
BACKEND_TERMINATING = "terminating"
FRONTEND_TYPES = ("ClusterIP", "NodePort", "ExternalIP", "LoadBalancer")
PROTOCOLS = ("TCP", "UDP")


@dataclass(frozen=True, order=True)
class Backend:
    """One endpoint address+port of a service port."""

    ip: str
    port: int
    protocol: str = "TCP"
    state: str = BACKEND_ACTIVE
    node_name: str = ""
    zone: str = ""
    cluster: str = ""  # Cluster Mesh: the remote cluster of a global Service's backend ("" = this cluster)
    cluster_id: int = 0  # ... and its id (0 = this cluster), written into the backend's LB map entry

    @property
    def l3n4(self) -> tuple[str, int, str]:
        return (self.ip, self.port, self.protocol)


@dataclass(frozen=True)
class LBService:
    """One frontend and the backends this node sends its traffic to."""

    namespace: str
    name: str
    port_name: str
    frontend_type: str          # one of FRONTEND_TYPES
    ip: str
    port: int
    protocol: str
    backends: tuple[Backend, ...] = ()
    session_affinity: bool = False
    affinity_timeout: int = 0
    ext_traffic_local: bool = False
    int_traffic_local: bool = False
    #: Cluster Mesh: a global Service's `service.cilium.io/affinity` (local|remote|none; "" = not global)
    cluster_affinity: str = ""

    @property
    def frontend(self) -> tuple[str, int, str]:
        return (self.ip, self.port, self.protocol)

    @property
    def service_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    def active_backends(self) -> tuple[Backend, ...]:
        return tuple(b for b in self.backends if b.state == BACKEND_ACTIVE)


@dataclass
class _ServicePort:
    name: str
    port: int
    protocol: str
    node_port: int = 0


@dataclass
class _Endpoints:
    """Backends per (port name, protocol) gathered from every slice of one service."""

    by_port: dict[tuple[str, str], list[Backend]] = field(default_factory=dict)


def _spec(obj: K8sObject | dict[str, Any]) -> dict[str, Any]:
    return obj.fields if isinstance(obj, K8sObject) else (obj.get("spec") or {})


def _ipv4(value: str, where: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValidationError(where, f"{value!r} is not an IPv4 address") from None


def _backend_state(conditions: dict[str, Any], publish_not_ready: bool) -> str | None:
    ready = conditions.get("ready")
    terminating = bool(conditions.get("terminating"))
    if terminating:
        return BACKEND_TERMINATING
    if ready is None or ready or publish_not_ready:
        return BACKEND_ACTIVE
    return None


def _slice_backends(slice_spec: dict[str, Any], publish_not_ready: bool, where: str) -> _Endpoints:
    out = _Endpoints()
    if slice_spec.get("addressType", "IPv4") != "IPv4":
        return out  # IPv6 slices: the datapath is IPv4-only for now
    for i, port in enumerate(slice_spec.get("ports") or []):
        number = port.get("port")
        if number is None:
            continue
        if not isinstance(number, int) or not 0 < number < 65536:
            raise ValidationError(f"{where}.ports[{i}].port", f"{number!r} is not a port")
        protocol = port.get("protocol") or "TCP"
        bucket = out.by_port.setdefault((port.get("name") or "", protocol), [])
        for j, endpoint in enumerate(slice_spec.get("endpoints") or []):
            state = _backend_state(endpoint.get("conditions") or {}, publish_not_ready)
            if state is None:
                continue
            for address in endpoint.get("addresses") or []:
                bucket.append(Backend(_ipv4(address, f"{where}.endpoints[{j}].addresses"), number, protocol,
                                      state, endpoint.get("nodeName") or "", endpoint.get("zone") or ""))
    return out


def _service_ports(spec: dict[str, Any], where: str) -> list[_ServicePort]:
    ports = []
    for i, port in enumerate(spec.get("ports") or []):
        number = port.get("port")
        if not isinstance(number, int) or not 0 < number < 65536:
            raise ValidationError(f"{where}.ports[{i}].port", f"{number!r} is not a port")
        protocol = port.get("protocol") or "TCP"
        if protocol not in PROTOCOLS:
            continue  # SCTP: not load-balanced yet
        ports.append(_ServicePort(port.get("name") or "", number, protocol, int(port.get("nodePort") or 0)))
    return ports


def _merge(backends: Iterable[Backend]) -> tuple[Backend, ...]:
    """One backend per address+port (a slice may repeat one); active beats terminating."""
    chosen: dict[tuple[str, int, str], Backend] = {}
    for b in backends:
        old = chosen.get(b.l3n4)
        if old is None or (old.state != BACKEND_ACTIVE and b.state == BACKEND_ACTIVE):
            chosen[b.l3n4] = b
    return tuple(sorted(chosen.values()))


def desired_services(services: Iterable[K8sObject], endpoint_slices: Iterable[K8sObject], *,
                     node_name: str, node_ips: Sequence[str] = (),
                     remote_backends: Mapping[tuple[str, str], Mapping[str, Sequence[Backend]]] | None = None
                     ) -> list[LBService]:
    """The LB entries of node `node_name` (whose addresses for NodePort are `node_ips`).

    `remote_backends`: Cluster Mesh, (namespace, name) -> port key (`lb.global_services.port_key`) -> the
    backends remote clusters share for that Service; used only for Services annotated global, per affinity.

    `services`: Service records (kind Service); `endpoint_slices`: EndpointSlice records,
    matched to their service by the `kubernetes.io/service-name` label and namespace.
    Sorted by (namespace, name, frontend) so the output is stable.
    """
    node_addrs = [_ipv4(ip, "node_ips") for ip in node_ips]
    slices: dict[tuple[str, str], list[K8sObject]] = {}
    for s in endpoint_slices:
        owner = s.labels.get(SERVICE_NAME_LABEL)
        if owner:
            slices.setdefault((s.namespace, owner), []).append(s)

    out: list[LBService] = []
    for svc in services:
        spec = _spec(svc)
        where = f"{svc.namespace}/{svc.name}.spec"
        svc_type = spec.get("type") or "ClusterIP"
        cluster_ip = spec.get("clusterIP") or ""
        if svc_type == "ExternalName" or not cluster_ip or cluster_ip == "None":
            continue
        if ":" in cluster_ip:
            continue  # IPv6 service
        cluster_ip = _ipv4(cluster_ip, f"{where}.clusterIP")
        publish = bool(spec.get("publishNotReadyAddresses"))
        affinity = spec.get("sessionAffinity") == "ClientIP"
        timeout = 0
        if affinity:
            cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
            timeout = int(cfg.get("timeoutSeconds") or DEFAULT_AFFINITY_TIMEOUT)
            if not 0 < timeout <= 86400:
                raise ValidationError(f"{where}.sessionAffinityConfig.clientIP.timeoutSeconds",
                                      f"{timeout} not in 1..86400")
        ext_local = spec.get("externalTrafficPolicy") == "Local"
        int_local = spec.get("internalTrafficPolicy") == "Local"

        gathered: dict[tuple[str, str], list[Backend]] = {}
        for s in sorted(slices.get((svc.namespace, svc.name), []), key=lambda o: o.name):
            for key, backends in _slice_backends(_spec(s), publish, f"{s.namespace}/{s.name}").by_port.items():
                gathered.setdefault(key, []).extend(backends)

        external_ips = [_ipv4(ip, f"{where}.externalIPs") for ip in spec.get("externalIPs") or []]
        lb_ips = []
        if svc_type == "LoadBalancer" and isinstance(svc, K8sObject):
            lb_ips = [_ipv4(ip, "status.loadBalancer") for ip in (svc.status or {}).get("loadBalancer") or []]

        for port in _service_ports(spec, where):
            all_backends = _merge(gathered.get((port.name, port.protocol), []))
            cluster_affinity = ""
            if remote_backends is not None and global_services.is_global(svc):
                remote = _merge((remote_backends.get((svc.namespace, svc.name)) or {}).get(
                    global_services.port_key(port.name, port.protocol), ()))
                cluster_affinity = global_services.affinity(svc)
                all_backends = global_services.choose(all_backends, remote, cluster_affinity,
                                                      active=lambda b: b.state == BACKEND_ACTIVE)
            local_backends = tuple(b for b in all_backends if b.node_name == node_name)

            def entry(ftype: str, ip: str, number: int, backends: tuple[Backend, ...]) -> LBService:
                # called only within this iteration, so the loop's current values are the ones meant
                return LBService(svc.namespace, svc.name, port.name, ftype, ip, number,  # noqa: B023
                                 port.protocol, backends, affinity, timeout, ext_local, int_local,  # noqa: B023
                                 cluster_affinity)  # noqa: B023

            out.append(entry("ClusterIP", cluster_ip, port.port, local_backends if int_local else all_backends))
            external = local_backends if ext_local else all_backends
            if svc_type in ("NodePort", "LoadBalancer") and port.node_port:
                out.extend(entry("NodePort", ip, port.node_port, external) for ip in node_addrs)
            out.extend(entry("ExternalIP", ip, port.port, external) for ip in external_ips)
            out.extend(entry("LoadBalancer", ip, port.port, external) for ip in lb_ips)

    out.sort(key=lambda s: (s.namespace, s.name, s.frontend_type, s.ip, s.port, s.protocol))
    return _dedupe_frontends(out)


def _dedupe_frontends(entries: list[LBService]) -> list[LBService]:
    """Two services claiming one frontend: the first (by namespace/name) keeps it."""
    seen: set[tuple[str, int, str]] = set()
    unique = []
    for e in entries:
        if e.frontend not in seen:
            seen.add(e.frontend)
            unique.append(e)
    return unique
