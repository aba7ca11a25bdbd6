"""The Kubernetes kinds Propolis names (the one table), and how each is listed, watched and trimmed.

``Kind.plural`` is also the first token of the object's key in the
``PROPOLIS_K8S_V1`` bucket (see `subjects.k8s_key`). ``normalize`` keeps only
the fields Propolis uses, so the bus carries small, stable records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from propolis.bandwidth.annotations import ANNOTATIONS as BANDWIDTH_ANNOTATIONS
from propolis.bus.messages import K8sObject

Obj = dict[str, Any]


def _meta(obj: Obj) -> Obj:
    return obj.get("metadata") or {}


def _pick(d: Obj | None, *keys: str) -> Obj:
    d = d or {}
    return {k: d[k] for k in keys if d.get(k) is not None}


def _ports(ports: list[Obj] | None, *keys: str) -> list[Obj]:
    return [_pick(p, *keys) for p in ports or []]


def norm_namespace(obj: Obj) -> tuple[Obj, Obj]:
    return {}, _pick(obj.get("status"), "phase")


def norm_pod(obj: Obj) -> tuple[Obj, Obj]:
    spec = obj.get("spec") or {}
    containers = [{"name": c.get("name", ""),
                   "ports": _ports(c.get("ports"), "name", "containerPort", "protocol", "hostPort", "hostIP")}
                  for c in spec.get("containers") or []]
    st = obj.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])
    status = _pick(st, "phase", "podIP", "hostIP")
    status["podIPs"] = [p.get("ip") for p in st.get("podIPs") or [] if p.get("ip")]
    status["ready"] = ready
    if _meta(obj).get("creationTimestamp"):
        status["created"] = _meta(obj)["creationTimestamp"]  # HostPort: of two claimants, the later one yields
    if _meta(obj).get("deletionTimestamp"):
        status["terminating"] = True
    return ({"nodeName": spec.get("nodeName", ""), "serviceAccountName": spec.get("serviceAccountName") or "default",
             "hostNetwork": bool(spec.get("hostNetwork")), "containers": containers}, status)


def norm_node(obj: Obj) -> tuple[Obj, Obj]:
    spec = _pick(obj.get("spec"), "podCIDR", "podCIDRs")
    st = obj.get("status") or {}
    return spec, {"addresses": _ports(st.get("addresses"), "type", "address")}


def norm_service(obj: Obj) -> tuple[Obj, Obj]:
    spec = _pick(obj.get("spec"), "type", "clusterIP", "clusterIPs", "selector", "sessionAffinity",
                 "sessionAffinityConfig", "externalTrafficPolicy", "internalTrafficPolicy", "externalIPs",
                 "loadBalancerSourceRanges", "publishNotReadyAddresses")
    spec["ports"] = _ports((obj.get("spec") or {}).get("ports"), "name", "port", "targetPort", "protocol", "nodePort")
    lb = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    return spec, {"loadBalancer": [i.get("ip") for i in lb if i.get("ip")]}


def norm_endpointslice(obj: Obj) -> tuple[Obj, Obj]:
    endpoints = [{"addresses": e.get("addresses") or [], "conditions": e.get("conditions") or {},
                  "nodeName": e.get("nodeName", ""), "zone": e.get("zone", ""),
                  "targetRef": _pick(e.get("targetRef"), "kind", "namespace", "name")}
                 for e in obj.get("endpoints") or []]
    return {"addressType": obj.get("addressType", "IPv4"), "endpoints": endpoints,
            "ports": _ports(obj.get("ports"), "name", "port", "protocol")}, {}


def norm_policy(obj: Obj) -> tuple[Obj, Obj]:
    """Policies travel whole: every field is policy."""
    spec: Obj = {}
    for k in ("spec", "specs"):
        if k in obj:
            spec[k] = obj[k]
    return spec, {}


def norm_cidr_group(obj: Obj) -> tuple[Obj, Obj]:
    """CiliumCIDRGroup: the CIDRs a policy's cidrGroupRef / cidrGroupSelector stands for."""
    return {"externalCIDRs": list((obj.get("spec") or {}).get("externalCIDRs") or [])}, {}


def norm_nothing(obj: Obj) -> tuple[Obj, Obj]:
    """For kinds Propolis names but does not mirror (their records would carry nothing it reads)."""
    return {}, {}


@dataclass(frozen=True)
class Kind:
    """One Kubernetes kind: where the API serves it, the names kubectl accepts, and its trimmed bus record.

    The one kind table (`ALL_KINDS`): the k8s-watcher lists and mirrors `KINDS`,
    the sandbox's API server serves `ALL_KINDS`, and its `apply` resolves names
    with `short_names`, so the three cannot disagree on a group, a plural or
    whether a kind is namespaced.
    """

    plural: str
    kind: str
    api_version: str
    namespaced: bool
    normalize: Callable[[Obj], tuple[Obj, Obj]]
    short_names: tuple[str, ...] = ()

    @property
    def group_version(self) -> tuple[str, str]:
        group, _, version = self.api_version.rpartition("/")
        return group, version

    @property
    def group(self) -> str:
        return self.group_version[0]

    @property
    def version(self) -> str:
        return self.group_version[1]

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def list_kind(self) -> str:
        return self.kind + "List"

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        """`/api/v1/namespaces/x/pods/a`; without a namespace, the all-namespaces (or cluster) collection."""
        group, version = self.group_version
        path = f"/apis/{group}/{version}" if group else f"/api/{version}"
        if self.namespaced and namespace:
            path += f"/namespaces/{namespace}"
        path += f"/{self.plural}"
        return path + (f"/{name}" if name else "")

    def list_path(self) -> str:
        return self.path()

    def to_record(self, obj: Obj) -> K8sObject:
        meta = _meta(obj)
        spec, status = self.normalize(obj)
        annotations = {k: v for k, v in (meta.get("annotations") or {}).items()
                       if "cilium.io" in k or "propolis" in k or k.startswith("io.cilium/")
                       or k in BANDWIDTH_ANNOTATIONS}
        if annotations:
            spec = {**spec, "annotations": annotations}
        return K8sObject(kind=self.kind, namespace=meta.get("namespace", "") if self.namespaced else "",
                         name=meta.get("name", ""), uid=meta.get("uid", ""),
                         resource_version=str(meta.get("resourceVersion", "")),
                         labels=dict(meta.get("labels") or {}), fields=spec, status=status)


KINDS: dict[str, Kind] = {k.plural: k for k in (
    Kind("namespaces", "Namespace", "v1", False, norm_namespace, ("ns",)),
    Kind("pods", "Pod", "v1", True, norm_pod, ("po",)),
    Kind("nodes", "Node", "v1", False, norm_node, ("no",)),
    Kind("services", "Service", "v1", True, norm_service, ("svc",)),
    Kind("endpointslices", "EndpointSlice", "discovery.k8s.io/v1", True, norm_endpointslice),
    Kind("networkpolicies", "NetworkPolicy", "networking.k8s.io/v1", True, norm_policy, ("netpol",)),
    Kind("ciliumnetworkpolicies", "CiliumNetworkPolicy", "cilium.io/v2", True, norm_policy, ("cnp", "ciliumnp")),
    Kind("ciliumclusterwidenetworkpolicies", "CiliumClusterwideNetworkPolicy", "cilium.io/v2", False, norm_policy,
         ("ccnp",)),
    Kind("ciliumcidrgroups", "CiliumCIDRGroup", "cilium.io/v2", False, norm_cidr_group, ("ccg",)),
)}
"""The kinds the k8s-watcher mirrors onto the bus, by plural."""

EVENT = Kind("events", "Event", "v1", True, norm_nothing, ("ev",))
"""Not mirrored (Propolis reads none); an API server serves it, so the sandbox's does too."""

ALL_KINDS: tuple[Kind, ...] = (*KINDS.values(), EVENT)
BY_KIND: dict[str, Kind] = {k.kind: k for k in ALL_KINDS}

POLICY_KINDS = ("networkpolicies", "ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies")
