"""Parse and validate NetworkPolicy (networking.k8s.io/v1) and CiliumNetworkPolicy /
CiliumClusterwideNetworkPolicy (cilium.io/v2) documents into `rules.Policy`.

Why: one gate for the k8s-watcher (refuse invalid objects, naming the field like the
apiserver: ``spec.ingress[0].toPorts[0].ports[0].port``) and the compiler (one
internal form). Unknown fields are refused. Scoping follows Cilium's
``ParseToCiliumRule``: a namespaced policy's endpointSelector gets
``k8s:io.kubernetes.pod.namespace=<ns>``; peer selectors without a namespace key get
it too (CCNP: ``Exists`` instead), unless they select reserved labels or the subject
selects ``reserved:init``. NetworkPolicy is translated the way Cilium translates it
(pod keys get source ``k8s``; namespaceSelector keys become
``k8s:io.cilium.k8s.namespace.labels.<key>``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from propolis.errors import ValidationError
from propolis.model import identity as idm
from propolis.model.labels import SOURCE_ANY, SOURCE_K8S, SOURCE_RESERVED
from propolis.model.selectors import LabelSelector, Requirement, equals, exists, parse_label_selector
from propolis.policy.rules import (
    CIDRRule,
    DNSRule,
    HeaderMatch,
    HTTPRule,
    ICMPField,
    KafkaRule,
    L7Rules,
    PeerRule,
    Policy,
    PortProtocol,
    PortRule,
    Rule,
    ServiceSelector,
    subnet_of,
)

KIND_NP = "NetworkPolicy"
KIND_CNP = "CiliumNetworkPolicy"
KIND_CCNP = "CiliumClusterwideNetworkPolicy"
API_VERSIONS = {KIND_NP: "networking.k8s.io/v1", KIND_CNP: "cilium.io/v2", KIND_CCNP: "cilium.io/v2"}

ENTITIES = ("all", "world", "world-ipv4", "world-ipv6", "cluster", "host", "remote-node", "kube-apiserver",
            "ingress", "health", "init", "unmanaged", "none")
CNP_PROTOCOLS = ("TCP", "UDP", "SCTP", "ICMP", "ICMPv6", "ANY")
NP_PROTOCOLS = ("TCP", "UDP", "SCTP")
MAX_PORTS_PER_RULE = 40  # Cilium's maxPorts
AUTH_MODES = ("disabled", "required", "test-always-fail")
MISMATCH_ACTIONS = ("LOG", "ADD", "DELETE", "REPLACE")
KAFKA_ROLES = ("produce", "consume")
KAFKA_API_KEYS = ("produce", "fetch", "offsets", "metadata", "leaderandisr", "stopreplica", "updatemetadata",
                  "controlledshutdown", "offsetcommit", "offsetfetch", "findcoordinator", "joingroup",
                  "heartbeat", "leavegroup", "syncgroup", "describegroups", "listgroups", "saslhandshake",
                  "apiversions", "createtopics", "deletetopics", "deleterecords", "initproducerid",
                  "offsetforleaderepoch", "addpartitionstotxn", "addoffsetstotxn", "endtxn", "writetxnmarkers",
                  "txnoffsetcommit", "describeacls", "createacls", "deleteacls", "describeconfigs", "alterconfigs")
ICMP_TYPES_V4 = {"EchoReply": 0, "DestinationUnreachable": 3, "Redirect": 5, "Echo": 8, "EchoRequest": 8,
                 "RouterAdvertisement": 9, "RouterSelection": 10, "TimeExceeded": 11, "ParameterProblem": 12,
                 "Timestamp": 13, "TimestampReply": 14, "Photuris": 40, "ExtendedEchoRequest": 42,
                 "ExtendedEchoReply": 43}
ICMP_TYPES_V6 = {"DestinationUnreachable": 1, "PacketTooBig": 2, "TimeExceeded": 3, "ParameterProblem": 4,
                 "EchoRequest": 128, "EchoReply": 129, "MulticastListenerQuery": 130,
                 "MulticastListenerReport": 131, "MulticastListenerDone": 132, "RouterSolicitation": 133,
                 "RouterAdvertisement": 134, "NeighborSolicitation": 135, "NeighborAdvertisement": 136,
                 "RedirectMessage": 137, "RouterRenumbering": 138, "ICMPNodeInformationQuery": 139,
                 "ICMPNodeInformationResponse": 140, "InverseNeighborDiscoverySolicitation": 141,
                 "InverseNeighborDiscoveryAdvertisement": 142, "HomeAgentAddressDiscoveryRequest": 144,
                 "HomeAgentAddressDiscoveryReply": 145, "MobilePrefixSolicitation": 146,
                 "MobilePrefixAdvertisement": 147, "DuplicateAddressRequestCodeSuffix": 157,
                 "DuplicateAddressConfirmationCodeSuffix": 158, "ExtendedEchoRequest": 160,
                 "ExtendedEchoReply": 161}

_PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]*[a-z0-9])?$")  # IANA_SVC_NAME
_FQDN_NAME = re.compile(r"^[-a-zA-Z0-9_.]+$")
_FQDN_PATTERN = re.compile(r"^[-a-zA-Z0-9_.*]+$")
_KAFKA_TOPIC = re.compile(r"^[a-zA-Z0-9._-]*$")

Doc = dict[str, Any]


# --- small typed readers ------------------------------------------------------------------
def _mapping(doc: Any, where: str, allowed: tuple[str, ...]) -> Doc:
    if not isinstance(doc, dict):
        raise ValidationError(where, "must be a mapping")
    for key in doc:
        if key not in allowed:
            raise ValidationError(f"{where}.{key}", "unknown field")
    return doc


def _list(doc: Any, where: str) -> list[Any]:
    if doc is None:
        return []
    if not isinstance(doc, list):
        raise ValidationError(where, "must be a list")
    return doc


def _string(doc: Any, where: str, *, allow_empty: bool = True) -> str:
    if doc is None:
        if not allow_empty:
            raise ValidationError(where, "required")
        return ""
    if not isinstance(doc, str):
        raise ValidationError(where, f"must be a string, not {type(doc).__name__}")
    if not allow_empty and not doc:
        raise ValidationError(where, "must not be empty")
    return doc


def _bool(doc: Any, where: str) -> bool | None:
    if doc is None:
        return None
    if not isinstance(doc, bool):
        raise ValidationError(where, "must be a boolean")
    return doc


def _regex(doc: Any, where: str) -> str:
    text = _string(doc, where)
    try:
        re.compile(text)
    except re.error as exc:
        raise ValidationError(where, f"invalid regular expression: {exc}") from None
    return text


def _enum(doc: Any, where: str, allowed: tuple[str, ...], *, default: str = "") -> str:
    if doc is None or doc == "":
        return default
    if doc not in allowed:
        raise ValidationError(where, f"must be one of {', '.join(allowed)}, not {doc!r}")
    return str(doc)


_Item = TypeVar("_Item")


def _items(doc: Any, where: str, parse: Callable[[Any, str], _Item]) -> tuple[_Item, ...]:
    return tuple(parse(item, f"{where}[{i}]") for i, item in enumerate(_list(doc, where)))


def _frozen(doc: Any) -> Any:
    """A JSON-ish value as nested tuples (hashable) for opaque sections (TLS, listener, groups)."""
    if isinstance(doc, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in doc.items()))
    if isinstance(doc, list):
        return tuple(_frozen(v) for v in doc)
    return doc


# --- networks ---------------------------------------------------------------------------
def parse_cidr(text: Any, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(text, str) or not text:
        raise ValidationError(where, "must be a CIDR string like 10.0.0.0/8")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValidationError(where, f"invalid CIDR {text!r}") from None


def _cidr_rule(cidr: Any, excepts: Any, where: str, cidr_key: str, except_key: str) -> CIDRRule:
    net = parse_cidr(cidr, f"{where}.{cidr_key}" if cidr_key else where)
    holes = []
    for i, text in enumerate(_list(excepts, f"{where}.{except_key}")):
        at = f"{where}.{except_key}[{i}]"
        hole = parse_cidr(text, at)
        if not subnet_of(hole, net):
            raise ValidationError(at, f"{text} is not inside {cidr}")
        holes.append(str(hole))
    return CIDRRule(str(net), tuple(holes))


def _cidr_set(doc: Any, where: str) -> CIDRRule:
    d = _mapping(doc, where, ("cidr", "except", "cidrGroupRef", "cidrGroupSelector"))
    present = [k for k in ("cidr", "cidrGroupRef", "cidrGroupSelector") if d.get(k)]
    if len(present) != 1:
        raise ValidationError(where, "exactly one of cidr, cidrGroupRef, cidrGroupSelector is required")
    if "cidr" in present:
        return _cidr_rule(d["cidr"], d.get("except"), where, "cidr", "except")
    if "cidrGroupSelector" in present:
        return CIDRRule("", (), cidr_group_selector=parse_label_selector(d["cidrGroupSelector"],
                                                                         f"{where}.cidrGroupSelector"))
    return CIDRRule("", (), _string(d["cidrGroupRef"], f"{where}.cidrGroupRef"))


# --- ports ------------------------------------------------------------------------------
def _port_value(doc: Any, where: str) -> tuple[int, str]:
    """A port is a number (int or numeric string) or an IANA service name."""
    if doc is None or doc == "":
        return 0, ""
    if isinstance(doc, bool):
        raise ValidationError(where, "must be a port number or name")
    if isinstance(doc, int):
        number = doc
    elif isinstance(doc, str) and doc.isdigit():
        number = int(doc)
    elif isinstance(doc, str):
        if len(doc) > 15 or not _PORT_NAME.match(doc):
            raise ValidationError(where, f"invalid port {doc!r}: a number 0-65535 or a port name (IANA_SVC_NAME)")
        return 0, doc
    else:
        raise ValidationError(where, "must be a port number or name")
    if not 0 <= number <= 65535:
        raise ValidationError(where, f"port {number} out of range 0-65535")
    return number, ""


def _port_protocol(doc: Any, where: str, *, protocols: tuple[str, ...], default: str,
                   zero_means_all: bool = True) -> PortProtocol:
    """`zero_means_all`: Cilium's port "0" = every port (for the rule's own peers); a NetworkPolicy's port
    must be 1-65535 when numeric (Kubernetes refuses 0), and an absent port already means every port."""
    d = _mapping(doc, where, ("port", "endPort", "protocol"))
    number, name = _port_value(d.get("port"), f"{where}.port")
    if not zero_means_all and d.get("port") not in (None, "") and not name and number == 0:
        raise ValidationError(f"{where}.port", "Invalid value: 0: must be between 1 and 65535, inclusive")
    protocol = _enum(d.get("protocol"), f"{where}.protocol", protocols, default=default)
    end = d.get("endPort")
    end_port = 0
    if end is not None:
        if isinstance(end, bool) or not isinstance(end, int) or not 0 <= end <= 65535:
            raise ValidationError(f"{where}.endPort", "must be a port number 0-65535")
        if name:
            raise ValidationError(f"{where}.endPort", "not allowed with a named port")
        if d.get("port") in (None, "") or number == 0:
            if end != 0:
                raise ValidationError(f"{where}.endPort", "requires a numeric port")
        elif end < number:
            raise ValidationError(f"{where}.endPort", f"must be >= port ({end} < {number})")
        end_port = end if end != number else 0
    return PortProtocol(port=number, name=name, end_port=end_port, protocol=protocol)


def _header_match(doc: Any, where: str) -> HeaderMatch:
    d = _mapping(doc, where, ("name", "value", "secret", "mismatch"))
    secret = None
    if d.get("secret") is not None:
        s = _mapping(d["secret"], f"{where}.secret", ("namespace", "name"))
        secret = (_string(s.get("namespace"), f"{where}.secret.namespace"),
                  _string(s.get("name"), f"{where}.secret.name", allow_empty=False))
    return HeaderMatch(name=_string(d.get("name"), f"{where}.name", allow_empty=False),
                       value=_string(d.get("value"), f"{where}.value"),
                       mismatch=_enum(d.get("mismatch"), f"{where}.mismatch", MISMATCH_ACTIONS), secret=secret)


def _http_rule(doc: Any, where: str) -> HTTPRule:
    d = _mapping(doc, where, ("method", "path", "host", "headers", "headerMatches"))
    headers = tuple(_string(h, f"{where}.headers[{i}]", allow_empty=False)
                    for i, h in enumerate(_list(d.get("headers"), f"{where}.headers")))
    return HTTPRule(method=_regex(d.get("method"), f"{where}.method"), path=_regex(d.get("path"), f"{where}.path"),
                    host=_regex(d.get("host"), f"{where}.host"), headers=headers,
                    header_matches=_items(d.get("headerMatches"), f"{where}.headerMatches", _header_match))


def _kafka_rule(doc: Any, where: str) -> KafkaRule:
    d = _mapping(doc, where, ("role", "apiKey", "apiVersion", "clientID", "topic"))
    role_doc = d.get("role")  # case-insensitive, as Cilium's Sanitize
    role = _enum(role_doc.lower() if isinstance(role_doc, str) else role_doc, f"{where}.role", KAFKA_ROLES)
    api_key = _string(d.get("apiKey"), f"{where}.apiKey").lower()
    if api_key and api_key not in KAFKA_API_KEYS:
        raise ValidationError(f"{where}.apiKey", f"unknown Kafka API key {d['apiKey']!r}")
    if role and api_key:
        raise ValidationError(f"{where}.role", "role and apiKey are mutually exclusive")
    version = _string(d.get("apiVersion"), f"{where}.apiVersion")
    if version and not version.isdigit():
        raise ValidationError(f"{where}.apiVersion", f"must be a number, not {version!r}")
    topic = _string(d.get("topic"), f"{where}.topic")
    if len(topic) > 255 or not _KAFKA_TOPIC.match(topic):
        raise ValidationError(f"{where}.topic", f"invalid Kafka topic {topic!r}")
    return KafkaRule(role=role, api_key=api_key, api_version=version,
                     client_id=_string(d.get("clientID"), f"{where}.clientID"), topic=topic)


def _fqdn_selector(doc: Any, where: str) -> DNSRule:
    d = _mapping(doc, where, ("matchName", "matchPattern"))
    name = _string(d.get("matchName"), f"{where}.matchName")
    pattern = _string(d.get("matchPattern"), f"{where}.matchPattern")
    if bool(name) == bool(pattern):
        raise ValidationError(where, "exactly one of matchName or matchPattern is required")
    if name and (len(name) > 255 or not _FQDN_NAME.match(name)):
        raise ValidationError(f"{where}.matchName", f"invalid DNS name {name!r}")
    if pattern and (len(pattern) > 255 or not _FQDN_PATTERN.match(pattern)):
        raise ValidationError(f"{where}.matchPattern", f"invalid DNS pattern {pattern!r}")
    return DNSRule(match_name=name.lower(), match_pattern=pattern.lower())


def _generic_l7(doc: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(doc, dict):
        raise ValidationError(where, "must be a mapping of string to string")
    return tuple(sorted((str(k), _string(v, f"{where}.{k}")) for k, v in doc.items()))


def _l7_rules(doc: Any, where: str) -> L7Rules:
    d = _mapping(doc, where, ("http", "kafka", "dns", "l7proto", "l7"))
    rules = L7Rules(http=_items(d.get("http"), f"{where}.http", _http_rule),
                    kafka=_items(d.get("kafka"), f"{where}.kafka", _kafka_rule),
                    dns=_items(d.get("dns"), f"{where}.dns", _fqdn_selector),
                    l7proto=_string(d.get("l7proto"), f"{where}.l7proto"),
                    l7=_items(d.get("l7"), f"{where}.l7", _generic_l7))
    families = [f for f in ("http", "kafka", "dns") if d.get(f)] + (["l7proto"] if rules.l7proto else [])
    if len(families) > 1:
        raise ValidationError(where, f"only one L7 family per port rule ({' and '.join(families)} given)")
    if rules.l7 and not rules.l7proto:
        raise ValidationError(f"{where}.l7proto", "required when l7 rules are given")
    return rules


def _tls(doc: Any, where: str) -> tuple[tuple[str, Any], ...]:
    d = _mapping(doc, where, ("secret", "trustedCA", "certificate", "privateKey"))
    s = _mapping(d.get("secret"), f"{where}.secret", ("namespace", "name"))
    _string(s.get("name"), f"{where}.secret.name", allow_empty=False)
    for k in ("trustedCA", "certificate", "privateKey"):
        _string(d.get(k), f"{where}.{k}")
    frozen: tuple[tuple[str, Any], ...] = _frozen(d)
    return frozen


def _listener(doc: Any, where: str) -> tuple[tuple[str, Any], ...]:
    d = _mapping(doc, where, ("envoyConfig", "name", "priority"))
    ec = _mapping(d.get("envoyConfig"), f"{where}.envoyConfig", ("kind", "name"))
    _enum(ec.get("kind"), f"{where}.envoyConfig.kind", ("CiliumEnvoyConfig", "CiliumClusterwideEnvoyConfig"))
    _string(ec.get("name"), f"{where}.envoyConfig.name", allow_empty=False)
    _string(d.get("name"), f"{where}.name", allow_empty=False)
    prio = d.get("priority")
    if prio is not None and (isinstance(prio, bool) or not isinstance(prio, int) or not 1 <= prio <= 100):
        raise ValidationError(f"{where}.priority", "must be an integer 1-100")
    frozen: tuple[tuple[str, Any], ...] = _frozen(d)
    return frozen


def _port_rule(doc: Any, where: str, *, deny: bool, egress: bool) -> PortRule:
    allowed = ("ports",) if deny else ("ports", "rules", "terminatingTLS", "originatingTLS", "serverNames", "listener")
    d = _mapping(doc, where, allowed)
    ports = _items(d.get("ports"), f"{where}.ports",
                   lambda p, at: _port_protocol(p, at, protocols=CNP_PROTOCOLS, default="ANY"))
    if len(ports) > MAX_PORTS_PER_RULE:
        raise ValidationError(f"{where}.ports", f"at most {MAX_PORTS_PER_RULE} ports per rule")
    rules = _l7_rules(d["rules"], f"{where}.rules") if d.get("rules") is not None else None
    if rules is not None and rules.kind:
        for i, p in enumerate(ports):
            at = f"{where}.ports[{i}]"
            if rules.dns:
                if not egress:
                    raise ValidationError(f"{where}.rules.dns", "DNS rules are only allowed on egress")
                if p.end_port:
                    raise ValidationError(f"{at}.endPort", "not allowed with DNS rules")
                if p.protocol not in ("UDP", "TCP", "ANY"):
                    raise ValidationError(f"{at}.protocol", "DNS rules need UDP, TCP or ANY")
            elif p.protocol not in ("TCP", "ANY"):
                raise ValidationError(f"{at}.protocol", f"{rules.kind} rules apply to TCP only")
    names = tuple(_string(n, f"{where}.serverNames[{i}]", allow_empty=False)
                  for i, n in enumerate(_list(d.get("serverNames"), f"{where}.serverNames")))
    return PortRule(ports=ports, rules=rules, server_names=names,
                    terminating_tls=_tls(d["terminatingTLS"], f"{where}.terminatingTLS") if d.get("terminatingTLS") else (),
                    originating_tls=_tls(d["originatingTLS"], f"{where}.originatingTLS") if d.get("originatingTLS") else (),
                    listener=_listener(d["listener"], f"{where}.listener") if d.get("listener") else ())


def _icmp_rule(doc: Any, where: str) -> tuple[ICMPField, ...]:
    d = _mapping(doc, where, ("fields",))
    out = []
    for i, f in enumerate(_list(d.get("fields"), f"{where}.fields")):
        at = f"{where}.fields[{i}]"
        fd = _mapping(f, at, ("family", "type"))
        family = _enum(fd.get("family"), f"{at}.family", ("IPv4", "IPv6"), default="IPv4")
        t = fd.get("type")
        names = ICMP_TYPES_V4 if family == "IPv4" else ICMP_TYPES_V6
        if isinstance(t, str) and t.isdigit():
            t = int(t)
        if isinstance(t, str):
            if t not in names:
                raise ValidationError(f"{at}.type", f"unknown {family} ICMP type name {t!r}")
            t = names[t]
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= 255:
            raise ValidationError(f"{at}.type", "must be an ICMP type 0-255 or a type name")
        out.append(ICMPField(family=family, type=t))
    return tuple(out)


def _service_selector(doc: Any, where: str, namespace: str) -> ServiceSelector:
    """Like Cilium's ParseToCiliumRule, an empty namespace is the policy's own (any, for a CCNP)."""
    d = _mapping(doc, where, ("k8sService", "k8sServiceSelector"))
    if bool(d.get("k8sService")) == bool(d.get("k8sServiceSelector")):
        raise ValidationError(where, "exactly one of k8sService or k8sServiceSelector is required")
    if d.get("k8sService"):
        s = _mapping(d["k8sService"], f"{where}.k8sService", ("serviceName", "namespace"))
        return ServiceSelector(
            namespace=_string(s.get("namespace"), f"{where}.k8sService.namespace") or namespace,
            name=_string(s.get("serviceName"), f"{where}.k8sService.serviceName"))
    s = _mapping(d["k8sServiceSelector"], f"{where}.k8sServiceSelector", ("selector", "namespace"))
    if "selector" not in s:
        raise ValidationError(f"{where}.k8sServiceSelector.selector", "required")
    return ServiceSelector(namespace=_string(s.get("namespace"), f"{where}.k8sServiceSelector.namespace") or namespace,
                           selector=parse_label_selector(s["selector"], f"{where}.k8sServiceSelector.selector",
                                                         default_source=SOURCE_K8S))


def _group(doc: Any, where: str) -> Any:
    d = _mapping(doc, where, ("aws",))
    aws = _mapping(d.get("aws") or {}, f"{where}.aws", ("labels", "securityGroupsIds", "securityGroupsNames", "region"))
    for k in ("securityGroupsIds", "securityGroupsNames"):
        for i, v in enumerate(_list(aws.get(k), f"{where}.aws.{k}")):
            _string(v, f"{where}.aws.{k}[{i}]")
    return _frozen(d)


# --- Cilium rules ---------------------------------------------------------------------
_PEER_FIELDS = {
    # (direction, deny) -> allowed fields
    ("ingress", False): ("fromEndpoints", "fromRequires", "fromCIDR", "fromCIDRSet", "fromEntities", "fromGroups",
                         "fromNodes", "toPorts", "icmps", "authentication"),
    ("ingress", True): ("fromEndpoints", "fromRequires", "fromCIDR", "fromCIDRSet", "fromEntities", "fromGroups",
                        "fromNodes", "toPorts", "icmps"),
    ("egress", False): ("toEndpoints", "toRequires", "toCIDR", "toCIDRSet", "toEntities", "toServices", "toFQDNs",
                        "toGroups", "toNodes", "toPorts", "icmps", "authentication"),
    ("egress", True): ("toEndpoints", "toRequires", "toCIDR", "toCIDRSet", "toEntities", "toServices", "toGroups",
                       "toNodes", "toPorts", "icmps"),
}


class _Scope:
    """How Cilium scopes peer selectors of one rule (namespace of the policy, CCNP, init)."""

    def __init__(self, namespace: str, matches_init: bool) -> None:
        self.namespace = namespace
        self.matches_init = matches_init

    def peer(self, sel: LabelSelector, *, skip_reserved: bool = True) -> LabelSelector:
        if skip_reserved and sel.has_source(SOURCE_RESERVED):
            return sel
        if sel.has_key(SOURCE_K8S, idm.POD_NAMESPACE_LABEL) or sel.has_key(SOURCE_ANY, idm.POD_NAMESPACE_LABEL):
            return sel
        if self.matches_init:
            return sel
        if not self.namespace:
            return sel.with_requirements([exists(SOURCE_K8S, idm.POD_NAMESPACE_LABEL)])
        return sel.with_requirements([equals(SOURCE_K8S, idm.POD_NAMESPACE_LABEL, self.namespace)])


def _peer_rule(doc: Any, where: str, direction: str, deny: bool, scope: _Scope) -> PeerRule:
    d = _mapping(doc, where, _PEER_FIELDS[(direction, deny)])
    p = "from" if direction == "ingress" else "to"
    # Cilium refuses several kinds of L3 peer in one rule ("combining X and Y is not supported yet");
    # a CIDR list and a CIDR set together are one kind here.
    l3 = [k for k in (f"{p}Endpoints", f"{p}CIDR", f"{p}CIDRSet", f"{p}Entities", f"{p}Nodes", f"{p}Groups",
                      "toServices", "toFQDNs") if d.get(k)]
    kinds = {k.replace("CIDRSet", "CIDR") for k in l3}
    if len(kinds) > 1:
        raise ValidationError(f"{where}.{l3[1]}", f"combining {l3[0]} and {l3[1]} is not supported")

    def selectors(key: str, *, scoped: bool = True, skip_reserved: bool = True) -> tuple[LabelSelector, ...] | None:
        if not d.get(key):
            return None
        sels = _items(d[key], f"{where}.{key}", parse_label_selector)
        return tuple(scope.peer(s, skip_reserved=skip_reserved) for s in sels) if scoped else sels

    cidrs: list[CIDRRule] = []
    for i, text in enumerate(_list(d.get(f"{p}CIDR"), f"{where}.{p}CIDR")):
        cidrs.append(_cidr_rule(text, None, f"{where}.{p}CIDR[{i}]", "", "except"))
    cidrs.extend(_items(d.get(f"{p}CIDRSet"), f"{where}.{p}CIDRSet", _cidr_set))
    entities = None
    if d.get(f"{p}Entities"):
        entities = tuple(_enum(e, f"{where}.{p}Entities[{i}]", ENTITIES)
                         for i, e in enumerate(_list(d[f"{p}Entities"], f"{where}.{p}Entities")))
    to_ports = _items(d.get("toPorts"), f"{where}.toPorts",
                      lambda x, at: _port_rule(x, at, deny=deny, egress=direction == "egress"))
    icmps: tuple[ICMPField, ...] = ()
    for i, item in enumerate(_list(d.get("icmps"), f"{where}.icmps")):
        icmps += _icmp_rule(item, f"{where}.icmps[{i}]")
    if to_ports and d.get("icmps"):
        raise ValidationError(f"{where}.icmps", "toPorts and icmps cannot be used in the same rule")
    auth = ""
    if d.get("authentication") is not None:
        a = _mapping(d["authentication"], f"{where}.authentication", ("mode",))
        auth = _enum(a.get("mode"), f"{where}.authentication.mode", AUTH_MODES)
    fqdns = _items(d.get("toFQDNs"), f"{where}.toFQDNs", _fqdn_selector) if d.get("toFQDNs") else None
    services = _items(d.get("toServices"), f"{where}.toServices",
                      lambda x, at: _service_selector(x, at, scope.namespace)) if d.get("toServices") else None
    groups = _items(d.get(f"{p}Groups"), f"{where}.{p}Groups", _group) if d.get(f"{p}Groups") else None
    return PeerRule(endpoints=selectors(f"{p}Endpoints"),
                    requires=selectors(f"{p}Requires", skip_reserved=False) or (),
                    entities=entities, cidrs=tuple(cidrs) if cidrs else None,
                    nodes=selectors(f"{p}Nodes", scoped=False), fqdns=fqdns, services=services, groups=groups,
                    to_ports=to_ports, icmps=icmps, authentication=auth)


RULE_FIELDS = ("endpointSelector", "nodeSelector", "ingress", "ingressDeny", "egress", "egressDeny", "labels",
               "description", "enableDefaultDeny", "log")


def parse_cilium_rule(doc: Any, where: str, *, namespace: str, origin: str = "") -> Rule:
    """One ``spec`` (or ``specs[i]``) of a CNP (namespace set) or CCNP (namespace "")."""
    d = _mapping(doc, where, RULE_FIELDS)
    has_ep, has_node = d.get("endpointSelector") is not None, d.get("nodeSelector") is not None
    if has_ep == has_node:
        raise ValidationError(where, "exactly one of endpointSelector or nodeSelector is required")
    if has_node and namespace:
        raise ValidationError(f"{where}.nodeSelector", "only allowed in a CiliumClusterwideNetworkPolicy")
    subject = node_subject = None
    matches_init = False
    if has_ep:
        subject = parse_label_selector(d["endpointSelector"], f"{where}.endpointSelector")
        matches_init = subject.has_key(SOURCE_RESERVED, "init")
        if namespace:
            given = subject.value_of(SOURCE_K8S, idm.POD_NAMESPACE_LABEL) or subject.value_of(
                SOURCE_ANY, idm.POD_NAMESPACE_LABEL)
            if given is not None and given != namespace:
                raise ValidationError(f"{where}.endpointSelector",
                                      f"selects namespace {given!r} but the policy lives in {namespace!r}")
            subject = subject.with_requirements([equals(SOURCE_K8S, idm.POD_NAMESPACE_LABEL, namespace)])
    else:
        node_subject = parse_label_selector(d["nodeSelector"], f"{where}.nodeSelector")
    scope = _Scope(namespace, matches_init)
    sections = {}
    for key, direction, deny in (("ingress", "ingress", False), ("ingressDeny", "ingress", True),
                                 ("egress", "egress", False), ("egressDeny", "egress", True)):
        sections[key] = _items(d.get(key), f"{where}.{key}",
                               partial(_peer_rule, direction=direction, deny=deny, scope=scope))
    edd = _mapping(d.get("enableDefaultDeny") or {}, f"{where}.enableDefaultDeny", ("ingress", "egress"))
    labels = []
    for i, lbl in enumerate(_list(d.get("labels"), f"{where}.labels")):
        ld = _mapping(lbl, f"{where}.labels[{i}]", ("key", "value", "source"))
        key = _string(ld.get("key"), f"{where}.labels[{i}].key", allow_empty=False)
        src = _string(ld.get("source"), f"{where}.labels[{i}].source") or "unspec"
        labels.append(f"{src}:{key}={_string(ld.get('value'), f'{where}.labels[{i}].value')}")
    if d.get("log") is not None:
        _mapping(d["log"], f"{where}.log", ("value",))
    return Rule(subject=subject, node_subject=node_subject, ingress=sections["ingress"],
                ingress_deny=sections["ingressDeny"], egress=sections["egress"], egress_deny=sections["egressDeny"],
                enable_default_deny_ingress=_bool(edd.get("ingress"), f"{where}.enableDefaultDeny.ingress"),
                enable_default_deny_egress=_bool(edd.get("egress"), f"{where}.enableDefaultDeny.egress"),
                description=_string(d.get("description"), f"{where}.description"), labels=tuple(labels),
                origin=origin, namespace=namespace)


# --- Kubernetes NetworkPolicy ----------------------------------------------------------------
def _np_peer(doc: Any, where: str, namespace: str) -> tuple[LabelSelector | None, CIDRRule | None]:
    d = _mapping(doc, where, ("podSelector", "namespaceSelector", "ipBlock"))
    if d.get("ipBlock") is not None:
        if d.get("podSelector") is not None or d.get("namespaceSelector") is not None:
            raise ValidationError(f"{where}.ipBlock", "may not be combined with podSelector or namespaceSelector")
        b = _mapping(d["ipBlock"], f"{where}.ipBlock", ("cidr", "except"))
        if not b.get("cidr"):
            raise ValidationError(f"{where}.ipBlock.cidr", "required")
        return None, _cidr_rule(b["cidr"], b.get("except"), f"{where}.ipBlock", "cidr", "except")
    if d.get("podSelector") is None and d.get("namespaceSelector") is None:
        raise ValidationError(where, "must specify a peer (podSelector, namespaceSelector or ipBlock)")
    reqs: list[Requirement] = []
    if d.get("podSelector") is not None:
        reqs.extend(parse_label_selector(d["podSelector"], f"{where}.podSelector", default_source=SOURCE_K8S,
                                         allow_source=False).requirements)
    if d.get("namespaceSelector") is not None:
        ns_sel = parse_label_selector(d["namespaceSelector"], f"{where}.namespaceSelector",
                                      key_prefix=idm.NAMESPACE_LABELS_PREFIX, default_source=SOURCE_K8S,
                                      allow_source=False)
        reqs.extend(ns_sel.requirements)
        reqs.append(exists(SOURCE_K8S, idm.POD_NAMESPACE_LABEL))
    else:
        reqs.append(equals(SOURCE_K8S, idm.POD_NAMESPACE_LABEL, namespace))
    return LabelSelector.of(reqs), None


def _np_rule(doc: Any, where: str, direction: str, namespace: str) -> PeerRule:
    peers_key = "from" if direction == "ingress" else "to"
    d = _mapping(doc, where, (peers_key, "ports"))
    ports = _items(d.get("ports"), f"{where}.ports",
                   lambda p, at: _port_protocol(p, at, protocols=NP_PROTOCOLS, default="TCP",
                                                zero_means_all=False))
    to_ports = (PortRule(ports=ports),) if ports else ()
    peers = _list(d.get(peers_key), f"{where}.{peers_key}")
    if not peers:  # missing or empty: every peer, inside the cluster or not
        return PeerRule(entities=("all",), to_ports=to_ports)
    selectors, cidrs = [], []
    for i, peer in enumerate(peers):
        sel, cidr = _np_peer(peer, f"{where}.{peers_key}[{i}]", namespace)
        if sel is not None:
            selectors.append(sel)
        if cidr is not None:
            cidrs.append(cidr)
    return PeerRule(endpoints=tuple(selectors) or None, cidrs=tuple(cidrs) or None, to_ports=to_ports,
                    k8s_ipblock=bool(cidrs))


def parse_network_policy(spec: Any, *, namespace: str, origin: str = "", where: str = "spec") -> Rule:
    d = _mapping(spec, where, ("podSelector", "ingress", "egress", "policyTypes"))
    if "podSelector" not in d:
        raise ValidationError(f"{where}.podSelector", "required")
    subject = parse_label_selector(d["podSelector"], f"{where}.podSelector", default_source=SOURCE_K8S,
                                   allow_source=False)
    subject = subject.with_requirements([equals(SOURCE_K8S, idm.POD_NAMESPACE_LABEL, namespace)])
    types = d.get("policyTypes")
    if types is None:
        types = ["Ingress"] + (["Egress"] if d.get("egress") is not None else [])
    types = _list(types, f"{where}.policyTypes")
    for i, t in enumerate(types):
        _enum(t, f"{where}.policyTypes[{i}]", ("Ingress", "Egress"))
    sections: dict[str, tuple[PeerRule, ...]] = {}
    for direction, key, type_name in (("ingress", "ingress", "Ingress"), ("egress", "egress", "Egress")):
        rules = _items(d.get(key), f"{where}.{key}", partial(_np_rule, direction=direction, namespace=namespace))
        if type_name in types:
            # Selected for this direction: default deny, even with no rules (an empty PeerRule selects no peer).
            sections[direction] = rules or (PeerRule(),)
        else:
            sections[direction] = ()
    return Rule(subject=subject, ingress=sections["ingress"], egress=sections["egress"], origin=origin,
                namespace=namespace)


# --- objects -----------------------------------------------------------------------------
def parse_policy_object(kind: str, obj: Doc) -> Policy:
    """A whole k8s object (apiVersion, kind, metadata, spec/specs) -> Policy; ValidationError on bad input."""
    if kind not in API_VERSIONS:
        raise ValidationError("kind", f"not a policy kind: {kind!r}")
    if not isinstance(obj, dict):
        raise ValidationError("", "a policy object must be a mapping")
    if obj.get("kind") not in (None, kind):
        raise ValidationError("kind", f"expected {kind}, got {obj.get('kind')!r}")
    if obj.get("apiVersion") not in (None, API_VERSIONS[kind]):
        raise ValidationError("apiVersion", f"{kind} is {API_VERSIONS[kind]}, not {obj.get('apiVersion')!r}")
    meta = obj.get("metadata") or {}
    if not isinstance(meta, dict):
        raise ValidationError("metadata", "must be a mapping")
    name = str(meta.get("name") or "")
    namespace = "" if kind == KIND_CCNP else str(meta.get("namespace") or "default")
    policy = Policy(kind, namespace, name)
    origin = policy.origin
    if kind == KIND_NP:
        if obj.get("spec") is None:
            raise ValidationError("spec", "required")
        return Policy(kind, namespace, name, (parse_network_policy(obj["spec"], namespace=namespace, origin=origin),))
    rules: list[Rule] = []
    if obj.get("spec") is not None:
        rules.append(parse_cilium_rule(obj["spec"], "spec", namespace=namespace, origin=origin))
    for i, spec in enumerate(_list(obj.get("specs"), "specs")):
        rules.append(parse_cilium_rule(spec, f"specs[{i}]", namespace=namespace, origin=origin))
    if not rules:
        raise ValidationError("spec", "a policy needs spec or specs")
    return Policy(kind, namespace, name, tuple(rules))


def policy_from_record(record: Any) -> Policy:
    """A mirrored K8sObject (bus/messages.py: kind, namespace, name, fields={"spec"|"specs": …}) or a raw dict."""
    if isinstance(record, dict):
        return parse_policy_object(str(record.get("kind")), record)
    body = dict(record.fields)
    body.pop("annotations", None)
    obj = {"kind": record.kind, "metadata": {"name": record.name, "namespace": record.namespace}, **body}
    return parse_policy_object(record.kind, obj)
