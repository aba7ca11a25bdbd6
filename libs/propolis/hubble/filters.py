"""Hubble's flow filters: a `FlowFilter` is a dict with flow.proto's filter field names.

Semantics as Hubble's: within one filter every field set must match (AND) and a field's values
are alternatives (OR); a flow passes when it matches any allow filter (or there are none) and no
deny filter. Filters are compiled once into predicates, so matching a flow costs a few dict reads.
Fields that need L7 or DNS records (`http_*`, `dns_query`) simply match nothing until such flows
exist.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from propolis.errors import ValidationError
from propolis.hubble.flow import Flow, flow_ports, protocol_of

FlowFilter = dict[str, Any]
Predicate = Callable[[Flow], bool]

EVENT_TYPE_NUMBERS = {"drop": 1, "debug": 2, "capture": 3, "trace": 4, "policy-verdict": 5, "l7": 129,
                      "agent": 9, "trace-sock": 12}


# --- label selectors as `hubble observe --label` takes them ---------------------------------
_SET_TERM = re.compile(r"^\s*(?P<key>[^\s!=]+)\s+(?P<op>in|notin)\s+\((?P<values>[^)]*)\)\s*$")


def _split_terms(text: str) -> list[str]:
    """Split on commas outside parentheses (`a in (x,y),b=c`)."""
    terms, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += ch
    terms.append(current)
    return [t.strip() for t in terms if t.strip()]


def _label_key(key: str) -> tuple[str | None, str]:
    """`k8s:app` -> ("k8s", "app"); `app` -> (None, "app"): any source."""
    source, sep, rest = key.partition(":")
    if sep and "/" not in source and "=" not in source:
        return source, rest
    return None, key


@dataclass(frozen=True)
class _LabelTerm:
    """One term of a label selector: key (in `source`, or any source if None) has a value in `allowed`
    (any value if None); `negate` inverts the answer (`notin`, `!=`, `!key`)."""

    source: str | None
    key: str
    allowed: frozenset[str] | None
    negate: bool = False

    def __call__(self, labels: dict[tuple[str, str], str]) -> bool:
        if self.source is not None:
            values = [labels[(self.source, self.key)]] if (self.source, self.key) in labels else []
        else:
            values = [v for (_, k), v in labels.items() if k == self.key]
        present = bool(values) if self.allowed is None else any(v in self.allowed for v in values)
        return present != self.negate


def compile_selector(text: str) -> Callable[[list[str]], bool]:
    """`app=web,env in (prod,dev),!debug` against Cilium label strings (`k8s:app=web`)."""
    checks: list[_LabelTerm] = []
    for term in _split_terms(text):
        if m := _SET_TERM.match(term):
            src, key = _label_key(m["key"])
            allowed = frozenset(v.strip() for v in m["values"].split(","))
            checks.append(_LabelTerm(src, key, allowed, negate=m["op"] == "notin"))
        elif "!=" in term:
            key, value = (x.strip() for x in term.split("!=", 1))
            src, key = _label_key(key)
            checks.append(_LabelTerm(src, key, frozenset({value}), negate=True))
        elif "=" in term:
            key, value = (x.strip() for x in term.replace("==", "=").split("=", 1))
            src, key = _label_key(key)
            checks.append(_LabelTerm(src, key, frozenset({value})))
        elif term.startswith("!"):
            src, key = _label_key(term[1:].strip())
            checks.append(_LabelTerm(src, key, None, negate=True))
        else:
            src, key = _label_key(term)
            checks.append(_LabelTerm(src, key, None))
    if not checks:
        raise ValidationError("label", f"empty label selector {text!r}")

    def match(labels: list[str]) -> bool:
        parsed: dict[tuple[str, str], str] = {}
        for lbl in labels:
            source, _, rest = lbl.partition(":")
            key, _, value = rest.partition("=")
            parsed[(source, key)] = value
        return all(check(parsed) for check in checks)

    return match


# --- field matchers -------------------------------------------------------------------------
def _ip_matcher(values: list[str]) -> Callable[[str], bool]:
    nets = []
    for v in values:
        try:
            nets.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise ValidationError("ip", f"{v!r} is not an IP address or CIDR") from None

    def match(ip: str) -> bool:
        if not ip:
            return False
        addr = ipaddress.ip_address(ip)
        return any(addr in n for n in nets)

    return match


def _name_matcher(values: list[str], what: str) -> Callable[[str, str], bool]:
    """Hubble's `[namespace/]name-prefix`: `ns/` = the whole namespace, `/name` = any namespace,
    a bare name = namespace `default`."""
    parsed = []
    for v in values:
        if not v:
            raise ValidationError(what, "must be [namespace/][<name>]")
        ns, sep, prefix = v.partition("/")
        parsed.append((ns, prefix) if sep else ("default", v))

    def match(namespace: str, name: str) -> bool:
        return any((not ns or ns == namespace) and name.startswith(prefix) for ns, prefix in parsed)

    return match


def _side(flow: Flow, side: str) -> dict[str, Any]:
    return flow.get(side) or {}


def _compile_field(name: str, values: Any) -> Predicate:
    vals = list(values) if isinstance(values, (list, tuple)) else [values]
    side = "source" if name.startswith("source_") else "destination" if name.startswith("destination_") else ""
    field = name.split("_", 1)[1] if side else name
    if field == "ip":
        m = _ip_matcher(vals)
        key = "source" if side == "source" else "destination"
        return lambda f: m((f.get("IP") or {}).get(key, ""))
    if field == "pod":
        m2 = _name_matcher(vals, name)
        return lambda f: bool(_side(f, side).get("pod_name")) and m2(_side(f, side).get("namespace", ""),
                                                                   _side(f, side).get("pod_name", ""))
    if field == "service":
        m3 = _name_matcher(vals, name)
        return lambda f: (svc := f.get(f"{side}_service")) is not None and m3(svc.get("namespace", ""),
                                                                               svc.get("name", ""))
    if field == "label":
        selectors = [compile_selector(v) for v in vals]
        return lambda f: any(s(_side(f, side).get("labels") or []) for s in selectors)
    if field == "identity":
        ids = {int(v) for v in vals}
        return lambda f: _side(f, side).get("identity") in ids
    if field == "workload":
        def wl(f: Flow) -> bool:
            for w in _side(f, side).get("workloads") or []:
                for v in vals:
                    kind, sep, wname = str(v).rpartition("/")
                    if w.get("name") == wname and (not sep or kind.lower() == w.get("kind", "").lower()):
                        return True
            return False
        return wl
    if field == "port":
        ports = {int(v) for v in vals}
        idx = 0 if side == "source" else 1
        return lambda f: flow_ports(f)[idx] in ports
    if field == "fqdn":
        patterns = [v.lower() for v in vals]
        return lambda f: any(fnmatch.fnmatch(n.lower(), p) for n in f.get(f"{side}_names") or []
                             for p in patterns)
    if name == "verdict":
        verdicts = {str(v).upper() for v in vals}
        return lambda f: f.get("verdict") in verdicts
    if name == "event_type":
        wanted = [_event_type(v) for v in vals]
        return lambda f: any((f.get("event_type") or {}).get("type") == t and
                             (st is None or (f.get("event_type") or {}).get("sub_type") == st) for t, st in wanted)
    if name == "protocol":
        protos = {str(v).lower() for v in vals}
        return lambda f: protocol_of(f).lower() in protos or ("icmp" in protos and protocol_of(f).startswith("ICMP"))
    if name == "node_name":
        pats = list(vals)
        return lambda f: any(fnmatch.fnmatchcase(f.get("node_name", ""), p if "/" not in p else p.split("/", 1)[1])
                             for p in pats)
    if name == "traffic_direction":
        dirs = {str(v).upper() for v in vals}
        return lambda f: f.get("traffic_direction") in dirs
    if name == "reply":
        want = {bool(v) for v in vals}
        return lambda f: bool(f.get("is_reply")) in want
    if name == "tcp_flags":
        sets = [{x.strip().upper() for x in str(v).split(",") if x.strip()} for v in vals]
        return lambda f: any(s <= set(((f.get("l4") or {}).get("TCP") or {}).get("flags") or {}) for s in sets)
    if name == "drop_reason_desc":
        reasons = {str(v).upper() for v in vals}
        return lambda f: f.get("drop_reason_desc") in reasons
    if name == "encrypted":
        encrypted = {_bool(v, name) for v in vals}
        return lambda f: bool((f.get("IP") or {}).get("encrypted")) in encrypted
    if name == "ip_version":
        versions = {str(v) for v in vals}
        return lambda f: (f.get("IP") or {}).get("ipVersion") in versions
    if name == "http_status_code":
        return _http_status(vals)
    if name == "http_method":
        methods = {str(v).upper() for v in vals}
        return lambda f: (((f.get("l7") or {}).get("http") or {}).get("method") or "").upper() in methods
    if name == "http_path":
        regexes = [re.compile(str(v)) for v in vals]
        return lambda f: any(r.search(((f.get("l7") or {}).get("http") or {}).get("url") or "") for r in regexes
                             if (f.get("l7") or {}).get("http"))
    if name == "dns_query":
        regexes = [re.compile(str(v)) for v in vals]
        return lambda f: any(r.search(((f.get("l7") or {}).get("dns") or {}).get("query") or "") for r in regexes
                             if (f.get("l7") or {}).get("dns"))
    if name == "uuid":
        ids = set(vals)
        return lambda f: f.get("uuid") in ids
    raise ValidationError("filter", f"unknown flow filter field {name!r}")


def _bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text not in ("true", "false"):
        raise ValidationError(what, f"{value!r} is not true or false")
    return text == "true"


def _event_type(value: Any) -> tuple[int, int | None]:
    if isinstance(value, dict):
        return int(value["type"]), value.get("sub_type") if value.get("match_sub_type") else None
    text = str(value)
    name, _, sub = text.partition(":")
    number = EVENT_TYPE_NUMBERS.get(name.lower())
    if number is None:
        try:
            number = int(name)
        except ValueError:
            raise ValidationError("type", f"unknown event type {name!r}; known: "
                                          f"{', '.join(EVENT_TYPE_NUMBERS)}") from None
    return number, int(sub) if sub.isdigit() else None


def _http_status(values: list[Any]) -> Predicate:
    """`200`, or a class `5+` (any 5xx) like Hubble."""
    classes: list[str] = []  # "5" for 5+
    codes: set[int] = set()
    for v in values:
        text = str(v)
        if text.endswith("+"):
            classes.append(text[:-1])
        else:
            codes.add(int(text))

    def match(f: Flow) -> bool:
        code = ((f.get("l7") or {}).get("http") or {}).get("code")
        return code is not None and (code in codes or any(str(code).startswith(p) for p in classes))

    return match


def compile_filter(spec: FlowFilter) -> Predicate:
    """All fields of one filter must match."""
    preds = [_compile_field(name, values) for name, values in spec.items() if values not in (None, [], "")]
    if not preds:
        return lambda f: True
    return lambda f: all(p(f) for p in preds)


class FlowMatcher:
    """Allow list OR'd, deny list OR'd: pass = (no allow filter or one matches) and no deny matches."""

    def __init__(self, allow: Iterable[FlowFilter] = (), deny: Iterable[FlowFilter] = ()) -> None:
        self.allow_specs, self.deny_specs = list(allow), list(deny)
        self.allow = [compile_filter(s) for s in self.allow_specs]
        self.deny = [compile_filter(s) for s in self.deny_specs]

    def __call__(self, flow: Flow) -> bool:
        if self.allow and not any(p(flow) for p in self.allow):
            return False
        return not any(p(flow) for p in self.deny)

    def as_dict(self) -> dict[str, list[FlowFilter]]:
        return {"whitelist": self.allow_specs, "blacklist": self.deny_specs}
