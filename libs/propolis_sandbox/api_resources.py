"""How the sandbox API serves each kind: discovery facts, field selectors and defaults.

Why here and not in the store: the store is kind-agnostic (resourceVersion,
history, watches); everything a kind does differently — which fields a field
selector may use, what `create` resets (a pod starts Pending), which defaults
it fills in — is one `Resource` entry. What a kind is (group, version, plural,
scope, short names) comes from the product's one table, `propolis.k8s.kinds`,
and what is valid from its one set of validators, `propolis.k8s.validate`
(which words errors as kube-apiserver does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from propolis.k8s.kinds import BY_KIND as KIND_TABLE
from propolis.k8s.kinds import Kind

Obj = dict[str, Any]

# --- defaults applied on create (what kube-apiserver's defaulting adds) -------------------------

def default_pod(obj: Obj) -> None:
    spec = obj.setdefault("spec", {})
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("serviceAccountName", "default")
    for c in spec.get("containers") or []:
        if isinstance(c, dict):
            for p in c.get("ports") or []:
                if isinstance(p, dict):
                    p.setdefault("protocol", "TCP")


def default_service(obj: Obj) -> None:
    spec = obj.setdefault("spec", {})
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    if spec["type"] != "ExternalName":
        spec.setdefault("internalTrafficPolicy", "Cluster")
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
    if spec["type"] in ("NodePort", "LoadBalancer"):
        spec.setdefault("externalTrafficPolicy", "Cluster")
    for p in spec.get("ports") or []:
        if isinstance(p, dict):
            p.setdefault("protocol", "TCP")
            p.setdefault("targetPort", p.get("port"))


def default_networkpolicy(obj: Obj) -> None:
    spec = obj.setdefault("spec", {})
    spec.setdefault("podSelector", {})
    if "policyTypes" not in spec:
        spec["policyTypes"] = ["Ingress"] + (["Egress"] if spec.get("egress") else [])
    for direction in ("ingress", "egress"):
        for rule in spec.get(direction) or []:
            for port in (rule or {}).get("ports") or []:
                if isinstance(port, dict):
                    port.setdefault("protocol", "TCP")


def default_namespace(obj: Obj) -> None:
    obj.setdefault("spec", {"finalizers": ["kubernetes"]})
    obj["status"] = {"phase": "Active"}
    obj.setdefault("metadata", {}).setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]


def _no_defaults(obj: Obj) -> None:
    return None


def fresh_pod_status(obj: Obj) -> Obj:
    return {"phase": "Pending", "qosClass": "BestEffort"}


@dataclass(frozen=True)
class Resource:
    """One served resource (`pods` in group "" version v1 …): its entry in the kind table and its API behaviour."""

    definition: Kind
    defaults: Callable[[Obj], None] = _no_defaults
    has_status: bool = False
    # what create does with a posted status: "keep", "reset" (drop it) or a function giving a fresh one
    status_on_create: str | Callable[[Obj], Obj] = "reset"
    extra_field_selectors: frozenset[str] = frozenset()
    categories: tuple[str, ...] = ()
    spec_keys: tuple[str, ...] = field(default=())  # top-level keys besides spec whose change bumps generation

    @property
    def group(self) -> str:
        return self.definition.group

    @property
    def version(self) -> str:
        return self.definition.version

    @property
    def kind(self) -> str:
        return self.definition.kind

    @property
    def plural(self) -> str:
        return self.definition.plural

    @property
    def namespaced(self) -> bool:
        return self.definition.namespaced

    @property
    def short_names(self) -> tuple[str, ...]:
        return self.definition.short_names

    @property
    def api_version(self) -> str:
        return self.definition.api_version

    @property
    def singular(self) -> str:
        return self.definition.singular

    @property
    def list_kind(self) -> str:
        return self.definition.list_kind

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def field_selectors(self) -> frozenset[str]:
        base = {"metadata.name"} | ({"metadata.namespace"} if self.namespaced else set())
        return frozenset(base) | self.extra_field_selectors

    def qualified(self) -> str:
        """`pods`, `endpointslices.discovery.k8s.io`: how Status messages name the resource."""
        return self.plural + (f".{self.group}" if self.group else "")

    def base_path(self, namespace: str | None) -> str:
        return self.definition.path(namespace)


RESOURCES: tuple[Resource, ...] = (
    Resource(KIND_TABLE["Namespace"], default_namespace, has_status=True, status_on_create="keep",
             extra_field_selectors=frozenset({"status.phase"})),
    Resource(KIND_TABLE["Node"], has_status=True, status_on_create="keep",
             extra_field_selectors=frozenset({"spec.unschedulable"})),
    Resource(KIND_TABLE["Pod"], default_pod, has_status=True, status_on_create=fresh_pod_status, categories=("all",),
             extra_field_selectors=frozenset({"spec.nodeName", "status.phase", "status.podIP", "spec.restartPolicy",
                                              "spec.schedulerName", "spec.serviceAccountName", "spec.hostNetwork",
                                              "status.nominatedNodeName"})),
    Resource(KIND_TABLE["Service"], default_service, has_status=True, categories=("all",),
             extra_field_selectors=frozenset({"spec.clusterIP", "spec.type"})),
    Resource(KIND_TABLE["Event"],
             extra_field_selectors=frozenset({"involvedObject.kind", "involvedObject.name", "reason", "type"}),
             spec_keys=("involvedObject", "reason", "message")),
    Resource(KIND_TABLE["EndpointSlice"], extra_field_selectors=frozenset({"addressType"}),
             spec_keys=("addressType", "endpoints", "ports")),
    Resource(KIND_TABLE["NetworkPolicy"], default_networkpolicy),
    Resource(KIND_TABLE["CiliumNetworkPolicy"], has_status=True, categories=("cilium", "ciliumpolicy"),
             spec_keys=("specs",)),
    Resource(KIND_TABLE["CiliumClusterwideNetworkPolicy"], has_status=True, categories=("cilium", "ciliumpolicy"),
             spec_keys=("specs",)),
    Resource(KIND_TABLE["CiliumCIDRGroup"], categories=("cilium",)),
)
"""Every kind in the table (`propolis.k8s.kinds.ALL_KINDS`), in discovery order."""

BY_PATH: dict[tuple[str, str, str], Resource] = {(r.group, r.version, r.plural): r for r in RESOURCES}
BY_KIND: dict[str, Resource] = {r.kind: r for r in RESOURCES}
