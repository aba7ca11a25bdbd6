"""The kinds the sandbox API serves, and validation of YAML documents before anything is applied.

Why validate on the client: `propolis sandbox apply` must refuse a file with
one bad document without applying the good ones, and say which document and
which field. So every document is parsed and checked here first (kind known,
apiVersion right, names valid, pods without duplicate ports…); only then does
anything reach the API server (which validates again, with a dry run).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from propolis.errors import ValidationError
from propolis.k8s import validate


@dataclass(frozen=True)
class ResourceKind:
    kind: str
    api_version: str
    plural: str
    namespaced: bool
    aliases: tuple[str, ...] = ()
    apply_order: int = 50  # namespaces first, deleted last

    @property
    def singular(self) -> str:
        return self.kind.lower()

    def path(self, namespace: str | None, name: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        return base + (f"/{name}" if name else "")


KINDS: dict[str, ResourceKind] = {k.kind: k for k in (
    ResourceKind("Namespace", "v1", "namespaces", False, ("ns", "namespace"), apply_order=0),
    ResourceKind("Node", "v1", "nodes", False, ("no", "node"), apply_order=5),
    ResourceKind("Pod", "v1", "pods", True, ("po", "pod")),
    ResourceKind("Service", "v1", "services", True, ("svc", "service")),
    ResourceKind("EndpointSlice", "discovery.k8s.io/v1", "endpointslices", True, ("endpointslice",)),
    ResourceKind("NetworkPolicy", "networking.k8s.io/v1", "networkpolicies", True, ("netpol", "networkpolicy")),
    ResourceKind("CiliumNetworkPolicy", "cilium.io/v2", "ciliumnetworkpolicies", True,
                 ("cnp", "ciliumnetworkpolicy")),
    ResourceKind("CiliumClusterwideNetworkPolicy", "cilium.io/v2", "ciliumclusterwidenetworkpolicies", False,
                 ("ccnp", "ciliumclusterwidenetworkpolicy")),
    ResourceKind("CiliumCIDRGroup", "cilium.io/v2", "ciliumcidrgroups", False, ("ccg", "ciliumcidrgroup")),
)}


def resolve_kind(name: str) -> ResourceKind:
    """`pods`, `pod`, `po`, `Pod`, `svc`, `cnp`… -> the kind."""
    wanted = name.lower()
    for kind in KINDS.values():
        if wanted in (kind.kind.lower(), kind.plural) or wanted in kind.aliases:
            return kind
    raise ValidationError("kind", f"unknown kind {name!r}; the sandbox serves: {', '.join(KINDS)}")


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
PROTOCOLS = ("TCP", "UDP", "SCTP")


@dataclass
class Document:
    """One YAML document with where it came from (for error messages)."""

    source: str
    index: int  # 1-based within the source
    body: dict[str, Any]
    kind: ResourceKind

    @property
    def name(self) -> str:
        return str(self.body.get("metadata", {}).get("name", ""))

    @property
    def namespace(self) -> str | None:
        if not self.kind.namespaced:
            return None
        return str(self.body.get("metadata", {}).get("namespace") or "default")

    @property
    def where(self) -> str:
        ident = f"{self.kind.kind} {self.namespace + '/' if self.namespace else ''}{self.name}"
        return f"{self.source} document {self.index} ({ident})"


def _files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise ValidationError("-f", f"{raw}: no such file or directory")
    return files


def load_documents(paths: list[str]) -> list[Document]:
    """Parse every file (multi-document YAML; `kind: List` expanded); errors name file and document."""
    docs: list[Document] = []
    for path in _files(paths):
        try:
            raw_docs = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as exc:
            raise ValidationError(str(path), f"not valid YAML: {exc}") from exc
        docs += documents_from(str(path), raw_docs)
    if not docs:
        raise ValidationError("-f", f"no documents in {', '.join(paths)}")
    return docs


def documents_from(source: str, raw_docs: list[Any]) -> list[Document]:
    """Objects already parsed (from a file, or built in code like the connectivity test's) -> Documents."""
    docs: list[Document] = []
    index = 0
    for raw in raw_docs:
        if raw is None:
            continue
        items = raw.get("items", []) if isinstance(raw, dict) and raw.get("kind") == "List" else [raw]
        for item in items:
            index += 1
            where = f"{source} document {index}"
            if not isinstance(item, dict):
                raise ValidationError(where, "a document must be a mapping")
            kind_name = item.get("kind")
            if not isinstance(kind_name, str) or not kind_name:
                raise ValidationError(f"{where}: kind", "missing")
            kind = KINDS.get(kind_name)
            if kind is None:
                raise ValidationError(f"{where}: kind", f"unknown kind {kind_name!r}; the sandbox serves: "
                                                        f"{', '.join(KINDS)}")
            docs.append(Document(source, index, item, kind))
    return docs


def validate_documents(docs: list[Document]) -> None:
    """Check every document; the first problem raises ValidationError('<file> document N (Kind ns/name): field')."""
    seen: dict[tuple[str, str | None, str], str] = {}
    for doc in docs:
        try:
            validate_document(doc)
        except ValidationError as exc:
            raise ValidationError(f"{doc.where}: {exc.field}", exc.reason) from None
        key = (doc.kind.kind, doc.namespace, doc.name)
        if key in seen:
            raise ValidationError(f"{doc.where}: metadata.name", f"defined twice (also in {seen[key]})")
        seen[key] = doc.where


def validate_document(doc: Document) -> None:
    body = doc.body
    if body.get("apiVersion") != doc.kind.api_version:
        raise ValidationError("apiVersion", f"{doc.kind.kind} is served as {doc.kind.api_version!r}, "
                                            f"got {body.get('apiVersion')!r}")
    meta = body.get("metadata")
    if not isinstance(meta, dict):
        raise ValidationError("metadata", "missing")
    name = meta.get("name")
    pattern, what = (_DNS_1035, "a DNS-1035 label") if doc.kind.kind == "Service" else \
        (_DNS_LABEL, "a DNS-1123 label") if doc.kind.kind == "Namespace" else (_DNS_SUBDOMAIN, "a DNS-1123 subdomain")
    limit = 63 if doc.kind.kind in ("Service", "Namespace") else 253
    if not isinstance(name, str) or not name or len(name) > limit or not pattern.match(name):
        raise ValidationError("metadata.name", f"invalid name {name!r}: must be {what} (lowercase letters, digits "
                                               f"and '-', at most {limit} characters)")
    if doc.kind.namespaced and "namespace" in meta:
        ns = meta["namespace"]
        if not isinstance(ns, str) or len(ns) > 63 or not _DNS_LABEL.match(ns):
            raise ValidationError("metadata.namespace", f"invalid namespace {ns!r}: must be a DNS-1123 label")
    for field_name in ("labels", "annotations"):
        value = meta.get(field_name)
        if value is not None and (not isinstance(value, dict) or
                                  not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
            raise ValidationError(f"metadata.{field_name}", "must map strings to strings")
    for error in validate.label_errors(body):
        raise error
    validator = _VALIDATORS.get(doc.kind.kind)
    if validator is not None:
        validator(body)


def _port_number(value: Any, field_name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ValidationError(field_name, f"must be an integer 1-65535, got {value!r}")
    return value


def _protocol(value: Any, field_name: str) -> str:
    protocol = value if value is not None else "TCP"
    if protocol not in PROTOCOLS:
        raise ValidationError(field_name, f"must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    return str(protocol)


def _port_name(value: Any, field_name: str) -> str:
    if not isinstance(value, str) or len(value) > 15 or not _PORT_NAME.match(value) or \
            not re.search(r"[a-z]", value) or "--" in value:
        raise ValidationError(field_name, f"invalid port name {value!r}: an IANA service name (at most 15 "
                                          "lowercase letters, digits and '-', with at least one letter)")
    return value


def validate_pod(body: dict[str, Any]) -> None:
    spec = body.get("spec")
    if not isinstance(spec, dict):
        raise ValidationError("spec", "missing")
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise ValidationError("spec.containers", "at least one container is required")
    names: set[str] = set()
    ports: dict[tuple[int, str], str] = {}
    port_names: dict[str, str] = {}
    for i, container in enumerate(containers):
        where = f"spec.containers[{i}]"
        if not isinstance(container, dict):
            raise ValidationError(where, "must be a mapping")
        cname = container.get("name")
        if not isinstance(cname, str) or not _DNS_LABEL.match(cname) or len(cname) > 63:
            raise ValidationError(f"{where}.name", f"invalid container name {cname!r}: must be a DNS-1123 label")
        if cname in names:
            raise ValidationError(f"{where}.name", f"duplicate container name {cname!r}")
        names.add(cname)
        if not isinstance(container.get("image"), str) or not container.get("image"):
            raise ValidationError(f"{where}.image", "required")
        for j, port in enumerate(container.get("ports") or []):
            pwhere = f"{where}.ports[{j}]"
            if not isinstance(port, dict):
                raise ValidationError(pwhere, "must be a mapping")
            number = _port_number(port.get("containerPort"), f"{pwhere}.containerPort")
            protocol = _protocol(port.get("protocol"), f"{pwhere}.protocol")
            if (number, protocol) in ports:
                raise ValidationError(f"{pwhere}.containerPort",
                                      f"duplicate port {number}/{protocol} (already declared at {ports[(number, protocol)]})")
            ports[(number, protocol)] = pwhere
            if "name" in port:
                pname = _port_name(port["name"], f"{pwhere}.name")
                if pname in port_names:
                    raise ValidationError(f"{pwhere}.name", f"duplicate port name {pname!r} (also {port_names[pname]})")
                port_names[pname] = pwhere
    node = spec.get("nodeName")
    if node is not None and (not isinstance(node, str) or not _DNS_SUBDOMAIN.match(node)):
        raise ValidationError("spec.nodeName", f"invalid node name {node!r}")


def validate_service(body: dict[str, Any]) -> None:
    spec = body.get("spec")
    if not isinstance(spec, dict):
        raise ValidationError("spec", "missing")
    svc_type = spec.get("type", "ClusterIP")
    if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        raise ValidationError("spec.type", f"unsupported type {svc_type!r}")
    selector = spec.get("selector")
    if selector is not None and (not isinstance(selector, dict) or
                                 not all(isinstance(k, str) and isinstance(v, str) for k, v in selector.items())):
        raise ValidationError("spec.selector", "must map strings to strings")
    ports = spec.get("ports") or []
    if not isinstance(ports, list):
        raise ValidationError("spec.ports", "must be a list")
    if not ports and spec.get("clusterIP") != "None" and svc_type != "ExternalName":
        raise ValidationError("spec.ports", "at least one port is required")
    seen: dict[tuple[int, str], str] = {}
    names: set[str] = set()
    for i, port in enumerate(ports):
        where = f"spec.ports[{i}]"
        if not isinstance(port, dict):
            raise ValidationError(where, "must be a mapping")
        number = _port_number(port.get("port"), f"{where}.port")
        protocol = _protocol(port.get("protocol"), f"{where}.protocol")
        if (number, protocol) in seen:
            raise ValidationError(f"{where}.port", f"duplicate port {number}/{protocol} (also {seen[(number, protocol)]})")
        seen[(number, protocol)] = where
        if len(ports) > 1 and "name" not in port:
            raise ValidationError(f"{where}.name", "required when a service has more than one port")
        if "name" in port:
            name = port["name"]
            if not isinstance(name, str) or not _DNS_LABEL.match(name) or len(name) > 63:
                raise ValidationError(f"{where}.name", f"invalid port name {name!r}")
            if name in names:
                raise ValidationError(f"{where}.name", f"duplicate port name {name!r}")
            names.add(name)
        target = port.get("targetPort")
        if isinstance(target, int):
            _port_number(target, f"{where}.targetPort")
        elif target is not None:
            _port_name(target, f"{where}.targetPort")
        if "nodePort" in port and port["nodePort"] is not None:
            _port_number(port["nodePort"], f"{where}.nodePort")


def validate_spec_mapping(body: dict[str, Any]) -> None:
    if "spec" in body and not isinstance(body["spec"], dict):
        raise ValidationError("spec", "must be a mapping")
    if "specs" in body and not isinstance(body["specs"], list):
        raise ValidationError("specs", "must be a list")


def validate_policy(body: dict[str, Any]) -> None:
    """Policies: the validators the API server and the k8s-watcher use (k8s/validate.py)."""
    validate_spec_mapping(body)
    for error in validate.policy_errors(str(body.get("kind")), body):
        raise error


_VALIDATORS = {
    "Pod": validate_pod,
    "Service": validate_service,
    "NetworkPolicy": validate_policy,
    "CiliumNetworkPolicy": validate_policy,
    "CiliumClusterwideNetworkPolicy": validate_policy,
}
