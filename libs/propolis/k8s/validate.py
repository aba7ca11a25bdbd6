"""The one set of validators for the Kubernetes objects Propolis names (kinds.py): metadata, structure, policies.

Why one set: the sandbox's API server refuses what these refuse (422, naming
the field, in kube-apiserver's wording: `metadata.name: Invalid value:
"Bad_Name": a lowercase RFC 1123 subdomain …`), `propolis sandbox apply`
refuses the same before sending anything, and the k8s-watcher gates on the
part that changes what is enforced (labels, policies) before anything reaches
the bus, keeping the last valid version in force. So the API can never accept
a policy the watcher later drops — a new isolation policy that silently does
nothing. Cilium CRDs get the structural check their CRD schema gives, then
the policy package's parser. Errors are propolis.errors.ValidationError
naming the field.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from propolis.errors import ValidationError
from propolis.k8s.kinds import Kind
from propolis.model.labels import kubernetes_label_errors

Obj = dict[str, Any]
Validator = Callable[[Obj], list[ValidationError]]

POLICY_KIND_NAMES = frozenset({"NetworkPolicy", "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"})
PROTOCOLS = ("TCP", "UDP", "SCTP")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN_RE = re.compile(rf"^{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*$")
_DNS1123_LABEL_RE = re.compile(rf"^{_DNS1123_LABEL}$")
_DNS1035_LABEL_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_IANA_SVC_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


# --- causes, worded as kube-apiserver words them ------------------------------------------------

def invalid(path: str, value: Any, message: str) -> ValidationError:
    """A `FieldValueInvalid` cause."""
    shown = f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
    return ValidationError(path, f"Invalid value: {shown}: {message}")


def required(path: str, message: str = "") -> ValidationError:
    return ValidationError(path, "Required value" + (f": {message}" if message else ""))


def duplicate(path: str, value: Any) -> ValidationError:
    return ValidationError(path, f'Duplicate value: "{value}"' if isinstance(value, str) else f"Duplicate value: {value}")


def unsupported(path: str, value: Any, allowed: tuple[str, ...]) -> ValidationError:
    return ValidationError(path, f'Unsupported value: "{value}": supported values: '
                                 + ", ".join(f'"{a}"' for a in allowed))


# --- names and numbers --------------------------------------------------------------------------

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


NAME_CHECKS: dict[str, Callable[[str, str], list[ValidationError]]] = {
    "Namespace": check_dns1123_label,
    "Service": check_dns1035_label,
}
"""What `metadata.name` must be, per kind (the rest: a DNS-1123 subdomain)."""


def name_errors(kind: str, name: str) -> list[ValidationError]:
    return NAME_CHECKS.get(kind, check_dns1123_subdomain)("metadata.name", name)


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


def label_errors(obj: Obj) -> list[ValidationError]:
    """`metadata.labels` against Kubernetes' rules (63-character values, qualified keys)."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    return kubernetes_label_errors(labels) if labels is not None else []


def policy_errors(kind: str, obj: Obj) -> list[ValidationError]:
    """A policy's spec/specs through the policy package's parser (the form the compiler reads)."""
    if kind not in POLICY_KIND_NAMES:
        return []
    from propolis.policy import parse  # the policy package owns the schema

    try:
        parse.parse_policy_object(kind, obj)
    except ValidationError as exc:
        return [exc]
    return []


# --- structure, per kind (what the API server's validation or the CRD schema checks) -----------

def pod_errors(obj: Obj) -> list[ValidationError]:
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


def service_errors(obj: Obj) -> list[ValidationError]:
    errors: list[ValidationError] = []
    spec = _as_dict(obj, "spec", "spec", errors)
    stype = spec.get("type", "ClusterIP")
    if stype not in SERVICE_TYPES:
        errors.append(unsupported("spec.type", stype, SERVICE_TYPES))
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


def endpointslice_errors(obj: Obj) -> list[ValidationError]:
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


def networkpolicy_errors(obj: Obj) -> list[ValidationError]:
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


def cilium_policy_errors(obj: Obj) -> list[ValidationError]:
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


def cidr_group_errors(obj: Obj) -> list[ValidationError]:
    """CiliumCIDRGroup: `spec.externalCIDRs` a list of CIDRs (what fromCIDRSet.cidrGroupRef names)."""
    errors: list[ValidationError] = []
    spec = _as_dict(obj, "spec", "spec", errors)
    for i, cidr in enumerate(_as_list(spec, "externalCIDRs", "spec.externalCIDRs", errors)):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except (TypeError, ValueError):
            errors.append(invalid(f"spec.externalCIDRs[{i}]", str(cidr)[:60], "must be a valid CIDR"))
    return errors


def node_errors(obj: Obj) -> list[ValidationError]:
    errors: list[ValidationError] = []
    spec = _as_dict(obj, "spec", "spec", errors)
    for i, cidr in enumerate(_as_list(spec, "podCIDRs", "spec.podCIDRs", errors)):
        if not isinstance(cidr, str) or "/" not in cidr:
            errors.append(invalid(f"spec.podCIDRs[{i}]", cidr, "must be a valid CIDR"))
    return errors


STRUCTURE: dict[str, Validator] = {
    "Pod": pod_errors,
    "Service": service_errors,
    "EndpointSlice": endpointslice_errors,
    "NetworkPolicy": networkpolicy_errors,
    "CiliumNetworkPolicy": cilium_policy_errors,
    "CiliumClusterwideNetworkPolicy": cilium_policy_errors,
    "CiliumCIDRGroup": cidr_group_errors,
    "Node": node_errors,
}


def metadata_errors(kind: str, obj: Obj) -> list[ValidationError]:
    """Name (when set: `generateName` may stand in), namespace, annotations and labels."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return [required("metadata")]
    errors: list[ValidationError] = []
    name = meta.get("name")
    if name is not None and name != "":
        errors += name_errors(kind, name) if isinstance(name, str) else [invalid("metadata.name", name, "must be a string")]
    namespace = meta.get("namespace")
    if namespace:
        errors += check_dns1123_label("metadata.namespace", str(namespace))
    annotations = meta.get("annotations")
    if annotations is not None and (not isinstance(annotations, dict)
                                    or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in annotations.items())):
        errors.append(invalid("metadata.annotations", str(annotations)[:60], "must be a map of strings"))
    return errors + label_errors(obj)


def object_errors(kind: str, obj: Obj, *, policies: bool = True) -> list[ValidationError]:
    """Every problem in an object of `kind` (a Kind's name: "Pod", "NetworkPolicy"…), as the API server refuses it.

    Policies go through the policy parser only once the structure holds
    (`policies=False` skips it, for an API server configured without it).
    """
    errors = metadata_errors(kind, obj)
    structure = STRUCTURE.get(kind)
    if structure is not None:
        errors += structure(obj)
    if not errors and policies:
        errors += policy_errors(kind, obj)
    return errors


def gate_errors(kind: str, obj: Obj) -> list[ValidationError]:
    """The part of `object_errors` that changes what is enforced: labels (identities) and policies."""
    return label_errors(obj) + policy_errors(kind, obj)


def validate_object(kind: Kind | str, obj: Obj) -> None:
    """Raise the first of `gate_errors` (the k8s-watcher's gate before the bus).

    Structure is the API server's to refuse; re-checking it here would only
    drop objects a real cluster holds and Propolis does not read.
    """
    errors = gate_errors(kind if isinstance(kind, str) else kind.kind, obj)
    if errors:
        raise errors[0]
