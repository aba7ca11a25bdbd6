"""The kinds the sandbox API serves: paths, discovery facts, defaults and validation per kind.

Why here and not in the store: the store is kind-agnostic (resourceVersion,
history, watches); everything a kind does differently — which fields a field
selector may use, what `create` resets (a pod starts Pending), what is
validated and with which message — is one `Resource` entry. Validation
messages follow kube-apiserver's wording (`metadata.name: Invalid value:
"Bad_Name": a lowercase RFC 1123 subdomain …`) so errors read the same as on a
real cluster. Cilium CRDs get only the structural check a CRD schema gives;
Propolis' own policy validator does the deep check elsewhere.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from propolis.errors import ValidationError

Obj = dict[str, Any]
Validator = Callable[[Obj], list[ValidationError]]

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN_RE = re.compile(rf"^{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*$")
_DNS1123_LABEL_RE = re.compile(rf"^{_DNS1123_LABEL}$")
_DNS1035_LABEL_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_IANA_SVC_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
PROTOCOLS = ("TCP", "UDP", "SCTP")


def invalid(path: str, value: Any, message: str) -> ValidationError:
    """A `FieldValueInvalid` cause with kube-apiserver's wording."""
    shown = f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
    return ValidationError(path, f"Invalid value: {shown}: {message}")


def required(path: str, message: str = "") -> ValidationError:
    return ValidationError(path, "Required value" + (f": {message}" if message else ""))


def duplicate(path: str, value: Any) -> ValidationError:
    return ValidationError(path, f'Duplicate value: "{value}"' if isinstance(value, str) else f"Duplicate value: {value}")


def unsupported(path: str, value: Any, allowed: tuple[str, ...]) -> ValidationError:
    return ValidationError(path, f'Unsupported value: "{value}": supported values: '
                                 + ", ".join(f'"{a}"' for a in allowed))


def check_dns1123_subdomain(path: str, value: str) -> list[ValidationError]:
    if len(value) <= 253 and _DNS1123_SUBDOMAIN_RE.match(value):
        return []
    return [invalid(path, value, "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
                                 "'-' or '.', and must start and end with an alphanumeric character (e.g. "
                                 "'example.com', regex used for validation is "
                                 "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")]


def check_dns1123_label(path: str, value: str) -> list[ValidationError]:
    if len(value) <= 63 and _DNS1123_LABEL_RE.match(value):
        return []
    return [invalid(path, value, "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or "
                                 "'-', and must start and end with an alphanumeric character (e.g. 'my-name',  or "
                                 "'123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')")]


def check_dns1035_label(path: str, value: str) -> list[ValidationError]:
    if len(value) <= 63 and _DNS1035_LABEL_RE.match(value):
        return []
    return [invalid(path, value, "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start "
                                 "with an alphabetic character, and end with an alphanumeric character (e.g. "
                                 "'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')")]


def check_port_name(path: str, value: Any) -> list[ValidationError]:
    if isinstance(value, str) and len(value) <= 15 and _IANA_SVC_NAME_RE.match(value) and "--" not in value \
            and re.search(r"[a-z]", value):
        return []
    return [invalid(path, value, "must be no more than 15 characters, contain only lowercase alphanumeric characters "
                                 "or '-', contain at least one letter, and not start, end or hold '--' (an "
                                 "IANA_SVC_NAME)")]


def check_port_number(path: str, value: Any) -> list[ValidationError]:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return []
    return [invalid(path, value, "must be between 1 and 65535, inclusive")]


def _as_list(obj: Obj, key: str, path: str, errors: list[ValidationError]) -> list[Any]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        errors.append(invalid(path, str(value)[:60], "must be a list"))
        return []
    return value


def _as_dict(obj: Obj, key: str, path: str, errors: list[ValidationError]) -> Obj:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        errors.append(invalid(path, str(value)[:60], "must be an object"))
        return {}
    return value


# --- per-kind validation ------------------------------------------------------------------

def validate_pod(obj: Obj) -> list[ValidationError]:
    errors: list[ValidationError] = []
    spec = _as_dict(obj, "spec", "spec", errors)
    containers = _as_list(spec, "containers", "spec.containers", errors)
    if not containers:
        errors.append(required("spec.containers"))
    seen_names: set[str] = set()
    seen_ports: dict[tuple[int, str], str] = {}
    seen_port_names: set[str] = set()
    for i, c in enumerate(containers):
        cpath = f"spec.containers[{i}]"
        if not isinstance(c, dict):
            errors.append(invalid(cpath, str(c)[:60], "must be an object"))
            continue
        name = c.get("name")
        if not name:
            errors.append(required(f"{cpath}.name"))
        elif not isinstance(name, str) or check_dns1123_label(f"{cpath}.name", name):
            errors += check_dns1123_label(f"{cpath}.name", str(name))
        elif name in seen_names:
            errors.append(duplicate(f"{cpath}.name", name))
        else:
            seen_names.add(name)
        if not c.get("image"):
            errors.append(required(f"{cpath}.image"))
        for j, p in enumerate(_as_list(c, "ports", f"{cpath}.ports", errors)):
            ppath = f"{cpath}.ports[{j}]"
            if not isinstance(p, dict):
                errors.append(invalid(ppath, str(p)[:60], "must be an object"))
                continue
            if "containerPort" not in p:
                errors.append(required(f"{ppath}.containerPort"))
            else:
                errors += check_port_number(f"{ppath}.containerPort", p["containerPort"])
            protocol = p.get("protocol", "TCP")
            if protocol not in PROTOCOLS:
                errors.append(unsupported(f"{ppath}.protocol", protocol, PROTOCOLS))
            if "hostPort" in p and p["hostPort"] not in (0, None):
                errors += check_port_number(f"{ppath}.hostPort", p["hostPort"])
            if p.get("name") is not None:
                port_errors = check_port_name(f"{ppath}.name", p["name"])
                errors += port_errors
                if not port_errors:
                    if p["name"] in seen_port_names:
                        errors.append(duplicate(f"{ppath}.name", p["name"]))
                    seen_port_names.add(p["name"])
            number = p.get("containerPort")
            if isinstance(number, int):
                key = (number, str(protocol))
                if key in seen_ports:
                    errors.append(ValidationError(f"{ppath}.containerPort",
                                                  f'Duplicate value: "{number}/{protocol}": already declared by '
                                                  f"{seen_ports[key]}"))
                else:
                    seen_ports[key] = f"{ppath}"
    node = spec.get("nodeName")
    if node:
        errors += check_dns1123_subdomain("spec.nodeName", str(node))
    return errors


def validate_service(obj: Obj) -> list[ValidationError]:
    errors: list[ValidationError] = []
    spec = _as_dict(obj, "spec", "spec", errors)
    stype = spec.get("type", "ClusterIP")
    types = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
    if stype not in types:
        errors.append(unsupported("spec.type", stype, types))
    ports = _as_list(spec, "ports", "spec.ports", errors)
    headless = spec.get("clusterIP") == "None"
    if not ports and stype != "ExternalName" and not headless:
        errors.append(required("spec.ports"))
    names: set[str] = set()
    seen: set[tuple[int, str]] = set()
    for i, p in enumerate(ports):
        ppath = f"spec.ports[{i}]"
        if not isinstance(p, dict):
            errors.append(invalid(ppath, str(p)[:60], "must be an object"))
            continue
        name = p.get("name")
        if len(ports) > 1 and not name:
            errors.append(required(f"{ppath}.name"))
        elif name:
            errors += check_dns1123_label(f"{ppath}.name", str(name))
            if name in names:
                errors.append(duplicate(f"{ppath}.name", name))
            names.add(name)
        if "port" not in p:
            errors.append(required(f"{ppath}.port"))
        else:
            errors += check_port_number(f"{ppath}.port", p["port"])
        protocol = p.get("protocol", "TCP")
        if protocol not in PROTOCOLS:
            errors.append(unsupported(f"{ppath}.protocol", protocol, PROTOCOLS))
        elif isinstance(p.get("port"), int):
            if (p["port"], protocol) in seen:
                errors.append(duplicate(ppath, {"port": p["port"], "protocol": protocol}))
            seen.add((p["port"], protocol))
        target = p.get("targetPort")
        if isinstance(target, str):
            errors += check_port_name(f"{ppath}.targetPort", target)
        elif target is not None:
            errors += check_port_number(f"{ppath}.targetPort", target)
        if p.get("nodePort") not in (None, 0):
            if stype not in ("NodePort", "LoadBalancer"):
                errors.append(ValidationError(f"{ppath}.nodePort",
                                              "Forbidden: may not be used when `type` is 'ClusterIP'"))
            else:
                errors += check_port_number(f"{ppath}.nodePort", p["nodePort"])
    selector = spec.get("selector")
    if selector is not None and not isinstance(selector, dict):
        errors.append(invalid("spec.selector", str(selector)[:60], "must be a map of labels"))
    return errors


def validate_endpointslice(obj: Obj) -> list[ValidationError]:
    errors: list[ValidationError] = []
    kinds = ("IPv4", "IPv6", "FQDN")
    if "addressType" not in obj:
        errors.append(required("addressType"))
    elif obj["addressType"] not in kinds:
        errors.append(unsupported("addressType", obj["addressType"], kinds))
    for i, ep in enumerate(_as_list(obj, "endpoints", "endpoints", errors)):
        addrs = ep.get("addresses") if isinstance(ep, dict) else None
        if not addrs or not isinstance(addrs, list):
            errors.append(required(f"endpoints[{i}].addresses", "must contain at least one address"))
    for i, p in enumerate(_as_list(obj, "ports", "ports", errors)):
        if isinstance(p, dict) and p.get("port") is not None:
            errors += check_port_number(f"ports[{i}].port", p["port"])
    return errors


def validate_networkpolicy(obj: Obj) -> list[ValidationError]:
    errors: list[ValidationError] = []
    spec = _as_dict(obj, "spec", "spec", errors)
    if not isinstance(spec.get("podSelector", {}), dict):
        errors.append(invalid("spec.podSelector", str(spec.get("podSelector"))[:60], "must be a label selector"))
    for i, t in enumerate(_as_list(spec, "policyTypes", "spec.policyTypes", errors)):
        if t not in ("Ingress", "Egress"):
            errors.append(unsupported(f"spec.policyTypes[{i}]", t, ("Ingress", "Egress")))
    for direction in ("ingress", "egress"):
        for i, rule in enumerate(_as_list(spec, direction, f"spec.{direction}", errors)):
            for j, port in enumerate(_as_list(rule, "ports", f"spec.{direction}[{i}].ports", errors)
                                     if isinstance(rule, dict) else []):
                protocol = port.get("protocol", "TCP") if isinstance(port, dict) else "TCP"
                if protocol not in PROTOCOLS:
                    errors.append(unsupported(f"spec.{direction}[{i}].ports[{j}].protocol", protocol, PROTOCOLS))
    return errors


def validate_cilium_policy(obj: Obj) -> list[ValidationError]:
    """What the CRD's structural schema checks: `spec` an object, `specs` a list of objects, one of them present."""
    errors: list[ValidationError] = []
    if "spec" not in obj and "specs" not in obj:
        errors.append(required("spec", "one of spec or specs must be set"))
    if "spec" in obj and not isinstance(obj["spec"], dict):
        errors.append(invalid("spec", str(obj["spec"])[:60], "spec in body must be of type object"))
    if "specs" in obj:
        if not isinstance(obj["specs"], list):
            errors.append(invalid("specs", str(obj["specs"])[:60], "specs in body must be of type array"))
        else:
            for i, s in enumerate(obj["specs"]):
                if not isinstance(s, dict):
                    errors.append(invalid(f"specs[{i}]", str(s)[:60], "specs[{i}] in body must be of type object"))
    return errors


def validate_cidr_group(obj: Obj) -> list[ValidationError]:
    """CiliumCIDRGroup: `spec.externalCIDRs` a list of CIDRs (what fromCIDRSet.cidrGroupRef names)."""
    errors: list[ValidationError] = []
    spec = _as_dict(obj, "spec", "spec", errors)
    for i, cidr in enumerate(_as_list(spec, "externalCIDRs", "spec.externalCIDRs", errors)):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except (TypeError, ValueError):
            errors.append(invalid(f"spec.externalCIDRs[{i}]", str(cidr)[:60], "must be a valid CIDR"))
    return errors


def validate_namespace(obj: Obj) -> list[ValidationError]:
    return []


def validate_node(obj: Obj) -> list[ValidationError]:
    errors: list[ValidationError] = []
    spec = _as_dict(obj, "spec", "spec", errors)
    for i, cidr in enumerate(_as_list(spec, "podCIDRs", "spec.podCIDRs", errors)):
        if not isinstance(cidr, str) or "/" not in cidr:
            errors.append(invalid(f"spec.podCIDRs[{i}]", cidr, "must be a valid CIDR"))
    return errors


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
    """One served resource (`pods` in group "" version v1 …) and its behaviour."""

    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    validate: Validator = validate_namespace
    defaults: Callable[[Obj], None] = _no_defaults
    name_check: Callable[[str, str], list[ValidationError]] = check_dns1123_subdomain
    has_status: bool = False
    # what create does with a posted status: "keep", "reset" (drop it) or a function giving a fresh one
    status_on_create: str | Callable[[Obj], Obj] = "reset"
    extra_field_selectors: frozenset[str] = frozenset()
    categories: tuple[str, ...] = ()
    spec_keys: tuple[str, ...] = field(default=())  # top-level keys besides spec whose change bumps generation

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def list_kind(self) -> str:
        return self.kind + "List"

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
        root = f"/apis/{self.group}/{self.version}" if self.group else "/api/v1"
        if self.namespaced and namespace:
            root += f"/namespaces/{namespace}"
        return f"{root}/{self.plural}"


RESOURCES: tuple[Resource, ...] = (
    Resource("", "v1", "Namespace", "namespaces", False, ("ns",), validate_namespace, default_namespace,
             check_dns1123_label, has_status=True, status_on_create="keep",
             extra_field_selectors=frozenset({"status.phase"})),
    Resource("", "v1", "Node", "nodes", False, ("no",), validate_node, _no_defaults, has_status=True,
             status_on_create="keep", extra_field_selectors=frozenset({"spec.unschedulable"})),
    Resource("", "v1", "Pod", "pods", True, ("po",), validate_pod, default_pod, has_status=True,
             status_on_create=fresh_pod_status, categories=("all",),
             extra_field_selectors=frozenset({"spec.nodeName", "status.phase", "status.podIP", "spec.restartPolicy",
                                              "spec.schedulerName", "spec.serviceAccountName", "spec.hostNetwork",
                                              "status.nominatedNodeName"})),
    Resource("", "v1", "Service", "services", True, ("svc",), validate_service, default_service,
             check_dns1035_label, has_status=True, categories=("all",),
             extra_field_selectors=frozenset({"spec.clusterIP", "spec.type"})),
    Resource("", "v1", "Event", "events", True, ("ev",), validate_namespace, _no_defaults,
             extra_field_selectors=frozenset({"involvedObject.kind", "involvedObject.name", "reason", "type"}),
             spec_keys=("involvedObject", "reason", "message")),
    Resource("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", True, (), validate_endpointslice,
             _no_defaults, extra_field_selectors=frozenset({"addressType"}),
             spec_keys=("addressType", "endpoints", "ports")),
    Resource("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies", True, ("netpol",),
             validate_networkpolicy, default_networkpolicy, has_status=False),
    Resource("cilium.io", "v2", "CiliumNetworkPolicy", "ciliumnetworkpolicies", True, ("cnp", "ciliumnp"),
             validate_cilium_policy, _no_defaults, has_status=True, categories=("cilium", "ciliumpolicy"),
             spec_keys=("specs",)),
    Resource("cilium.io", "v2", "CiliumClusterwideNetworkPolicy", "ciliumclusterwidenetworkpolicies", False,
             ("ccnp",), validate_cilium_policy, _no_defaults, has_status=True,
             categories=("cilium", "ciliumpolicy"), spec_keys=("specs",)),
    Resource("cilium.io", "v2", "CiliumCIDRGroup", "ciliumcidrgroups", False, ("ccg",), validate_cidr_group,
             _no_defaults, categories=("cilium",)),
)

BY_PATH: dict[tuple[str, str, str], Resource] = {(r.group, r.version, r.plural): r for r in RESOURCES}
BY_KIND: dict[str, Resource] = {r.kind: r for r in RESOURCES}
