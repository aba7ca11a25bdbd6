"""Hubble's flow metrics: names, labels and the `hubble.metrics.enabled` option syntax of Cilium.

`parse_enabled("{dns,drop,tcp,flow,icmp,http,port-distribution,policy}")` or the agent's form
`"flow:sourceContext=namespace;destinationContext=pod|ip drop"` selects handlers; each handler
counts flows into Prometheus counters whose first labels come from its context options
(`sourceContext` -> label `source`, `destinationContext` -> `destination`, `labelsContext` ->
one label per listed name). Values of a context option are alternatives: the first non-empty
wins (`pod|ip`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import prometheus_client as prom

from propolis.errors import ValidationError
from propolis.hubble.flow import ICMP_TYPE_NAMES, OBSERVATION_POINTS, Flow, flow_ports, protocol_of
from propolis.maps.events import MATCH_TYPE_NAMES

CONTEXT_VALUES = ("identity", "namespace", "pod", "pod-name", "dns", "ip", "reserved-identity", "workload",
                  "workload-name", "app")
LABELS_CONTEXT = ("source_ip", "source_namespace", "source_pod", "source_workload", "source_workload_kind",
                  "source_app", "destination_ip", "destination_namespace", "destination_pod",
                  "destination_workload", "destination_workload_kind", "destination_app", "traffic_direction")
CONTEXT_OPTIONS = ("sourceContext", "destinationContext", "sourceEgressContext", "sourceIngressContext",
                   "destinationEgressContext", "destinationIngressContext", "labelsContext")
HANDLER_OPTIONS = {"dns": ("query", "ignoreAAAA"), "http": ("exemplars",), "flow": (), "drop": (), "tcp": (),
                   "icmp": (), "port-distribution": (), "policy": ()}


@dataclass(frozen=True)
class MetricSpec:
    """One enabled handler and its options (option -> values)."""

    name: str
    options: dict[str, list[str]] = field(default_factory=dict)


def _parse_one(text: str) -> MetricSpec:
    name, _, opts = text.partition(":")
    name = name.strip()
    if name not in HANDLER_OPTIONS:
        raise ValidationError("hubble_metrics", f"unknown metric {name!r}; known: {', '.join(HANDLER_OPTIONS)}")
    options: dict[str, list[str]] = {}
    for opt in filter(None, (o.strip() for o in opts.split(";"))):
        key, sep, value = opt.partition("=")
        if key not in CONTEXT_OPTIONS and key not in HANDLER_OPTIONS[name]:
            raise ValidationError("hubble_metrics", f"{name}: unknown option {key!r}")
        if key == "labelsContext":
            values = [v.strip() for v in value.split(",") if v.strip()]
            bad = [v for v in values if v not in LABELS_CONTEXT]
        else:
            values = [v.strip() for v in value.split("|") if v.strip()] if sep else ["true"]
            bad = [v for v in values if v not in CONTEXT_VALUES] if key in CONTEXT_OPTIONS else []
        if bad:
            raise ValidationError("hubble_metrics", f"{name}: {key} does not know {', '.join(bad)}")
        options[key] = values
    return MetricSpec(name, options)


def parse_enabled(text: str | list[str]) -> list[MetricSpec]:
    """Cilium's `hubble.metrics.enabled`: a list, `{a,b}`, or space-separated handler specs."""
    if isinstance(text, list):
        pieces = text
    else:
        text = text.strip()
        if text.startswith("{") and text.endswith("}"):
            text = text[1:-1]
        pieces = []
        for raw in re.split(r"\s+", text):
            for part in raw.split(","):
                head = part.partition(":")[0]
                if pieces and (head not in HANDLER_OPTIONS or not part):
                    pieces[-1] += "," + part  # a comma inside labelsContext=a,b
                elif part:
                    pieces.append(part)
    specs = [_parse_one(p) for p in pieces if p.strip()]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValidationError("hubble_metrics", "a metric is enabled twice")
    return specs


# --- context labels -------------------------------------------------------------------------
def _app(ep: dict[str, Any]) -> str:
    labels: list[str] = ep.get("labels") or []
    for lbl in labels:
        for key in ("k8s:app.kubernetes.io/name=", "k8s:app=", "k8s:k8s-app="):
            if lbl.startswith(key):
                return lbl[len(key):]
    return ""


def _workload(ep: dict[str, Any]) -> dict[str, str]:
    workloads: list[dict[str, str]] = ep.get("workloads") or [{}]
    return workloads[0]


def context_value(kind: str, flow: Flow, side: str) -> str:
    ep = flow.get(side) or {}
    ns: str = ep.get("namespace", "")
    if kind == "namespace":
        return ns
    if kind == "pod":
        return f"{ns}/{ep['pod_name']}" if ep.get("pod_name") else ""
    if kind == "pod-name":
        return str(ep.get("pod_name", ""))
    if kind == "workload":
        w = _workload(ep)
        return f"{ns}/{w['name']}" if w.get("name") else ""
    if kind == "workload-name":
        return _workload(ep).get("name", "")
    if kind == "identity":
        return ",".join(ep.get("labels") or [])
    if kind == "reserved-identity":
        labels = [lbl for lbl in ep.get("labels") or [] if lbl.startswith("reserved:")]
        return labels[0] if labels else ""
    if kind == "ip":
        return str((flow.get("IP") or {}).get(side, ""))
    if kind == "dns":
        return ",".join(flow.get(f"{side}_names") or [])  # Hubble's source_names / destination_names
    if kind == "app":
        return _app(ep)
    return ""


def _labels_context_value(name: str, flow: Flow) -> str:
    if name == "traffic_direction":
        return str(flow.get("traffic_direction", "")).lower()
    side, _, what = name.partition("_")
    if what == "workload_kind":
        return _workload(flow.get(side) or {}).get("kind", "")
    return context_value({"workload": "workload-name", "pod": "pod-name"}.get(what, what), flow, side)


class Context:
    """The context labels a handler puts first, from its options."""

    def __init__(self, options: dict[str, list[str]]) -> None:
        self.options = options
        self.names: list[str] = []
        self._getters: list[Callable[[Flow], str]] = []
        for side in ("source", "destination"):
            plain = options.get(f"{side}Context")
            egress, ingress = options.get(f"{side}EgressContext"), options.get(f"{side}IngressContext")
            if plain or egress or ingress:
                self.names.append(side)
                self._getters.append(self._side_getter(side, plain or [], egress or plain or [],
                                                       ingress or plain or []))
        for name in options.get("labelsContext", []):
            self.names.append(name)
            self._getters.append(partial(_labels_context_value, name))

    @staticmethod
    def _side_getter(side: str, plain: list[str], egress: list[str], ingress: list[str]) -> Callable[[Flow], str]:
        def get(flow: Flow) -> str:
            direction = flow.get("traffic_direction")
            kinds = egress if direction == "EGRESS" else ingress if direction == "INGRESS" else plain
            for kind in kinds:
                if value := context_value(kind, flow, side):
                    return value
            return ""
        return get

    def values(self, flow: Flow) -> list[str]:
        return [g(flow) for g in self._getters]


# --- handlers -------------------------------------------------------------------------------
_TRACE_SUBTYPES = {v: v.lower().replace("_", "-") for v in OBSERVATION_POINTS.values()}
_EVENT_TYPE_NAMES = {1: "Drop", 4: "Trace", 5: "PolicyVerdict", 129: "L7"}


class _Batched:
    """A labelled counter counted in a dict and handed to prometheus-client in batches: its
    `labels().inc()` takes a lock and validates labels on every call, which at tens of thousands
    of flows a second was the observer's largest cost. `flush()` runs before every scrape."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], Any] = {}
        self.pending: dict[tuple[str, ...], float] = {}

    def inc(self, *values: str) -> None:
        self.pending[values] = self.pending.get(values, 0) + 1

    def add(self, values: tuple[str, ...], n: float) -> None:
        self.pending[values] = self.pending.get(values, 0) + n

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for values, n in pending.items():
            child = self.children.get(values)
            if child is None:
                child = self.children[values] = self.metric.labels(*values)
            child.inc(n)


class _FlushOnScrape:
    """A collector with no metrics of its own, registered first: collecting it flushes the batches."""

    def __init__(self, flush: Any) -> None:
        self.flush = flush

    def collect(self) -> list[Any]:
        self.flush()
        return []

    def describe(self) -> list[Any]:
        return []


class Handler:
    name = ""

    def __init__(self, registry: prom.CollectorRegistry, options: dict[str, list[str]]) -> None:
        self.ctx = Context(options)
        self.options = options
        self.batched: list[_Batched] = []
        self.setup(registry)

    def counter(self, registry: prom.CollectorRegistry, name: str, doc: str, labels: list[str]) -> _Batched:
        counter = _Batched(prom.Counter(name, doc, self.ctx.names + labels, registry=registry))
        self.batched.append(counter)
        return counter

    def setup(self, registry: prom.CollectorRegistry) -> None:
        raise NotImplementedError

    def process(self, flow: Flow) -> None:
        raise NotImplementedError


class FlowHandler(Handler):
    name = "flow"

    def setup(self, registry: prom.CollectorRegistry) -> None:
        self.flows = self.counter(registry, "hubble_flows_processed_total", "Total number of flows processed",
                                  ["protocol", "type", "subtype", "verdict"])

    def process(self, flow: Flow) -> None:
        etype = (flow.get("event_type") or {}).get("type", 0)
        type_name = _EVENT_TYPE_NAMES.get(etype, "Unknown")
        subtype = ""
        if type_name == "Trace":
            subtype = _TRACE_SUBTYPES.get(flow.get("trace_observation_point", ""), "")
        elif type_name == "L7":
            subtype = protocol_of(flow)
        elif type_name == "Unknown":
            subtype = str(etype)
        self.flows.inc(*self.ctx.values(flow), protocol_of(flow), type_name, subtype, flow.get("verdict", ""))


class DropHandler(Handler):
    name = "drop"

    def setup(self, registry: prom.CollectorRegistry) -> None:
        self.drops = self.counter(registry, "hubble_drop_total", "Number of drops", ["reason", "protocol"])

    def process(self, flow: Flow) -> None:
        if flow.get("verdict") == "DROPPED" and (flow.get("event_type") or {}).get("type") == 1:
            self.drops.inc(*self.ctx.values(flow), flow.get("drop_reason_desc", ""), protocol_of(flow))


class TcpHandler(Handler):
    name = "tcp"

    def setup(self, registry: prom.CollectorRegistry) -> None:
        self.tcp = self.counter(registry, "hubble_tcp_flags_total", "TCP flag occurrences", ["flag", "family"])

    def process(self, flow: Flow) -> None:
        if flow.get("verdict") not in ("FORWARDED", "REDIRECTED"):
            return
        tcp = (flow.get("l4") or {}).get("TCP")
        if not tcp:
            return
        flags = tcp.get("flags") or {}
        family = (flow.get("IP") or {}).get("ipVersion", "IPv4")
        names = []
        if flags.get("SYN"):
            names.append("SYN-ACK" if flags.get("ACK") else "SYN")
        names += [n for n in ("FIN", "RST") if flags.get(n)]
        for n in names:
            self.tcp.inc(*self.ctx.values(flow), n, family)


class IcmpHandler(Handler):
    name = "icmp"

    def setup(self, registry: prom.CollectorRegistry) -> None:
        self.icmp = self.counter(registry, "hubble_icmp_total", "Number of ICMP messages", ["family", "type"])

    def process(self, flow: Flow) -> None:
        icmp = (flow.get("l4") or {}).get("ICMPv4")
        if icmp is not None:
            self.icmp.inc(*self.ctx.values(flow), "IPv4", ICMP_TYPE_NAMES.get(icmp["type"], str(icmp["type"])))


class PortDistributionHandler(Handler):
    name = "port-distribution"

    def setup(self, registry: prom.CollectorRegistry) -> None:
        self.ports = self.counter(registry, "hubble_port_distribution_total", "Numbers of packets distributed by "
                                  "destination port", ["protocol", "port"])

    def process(self, flow: Flow) -> None:
        if flow.get("verdict") != "FORWARDED" or flow.get("is_reply"):
            return
        _, dport = flow_ports(flow)
        if dport is not None:
            self.ports.inc(*self.ctx.values(flow), protocol_of(flow), str(dport))


class PolicyHandler(Handler):
    name = "policy"

    def setup(self, registry: prom.CollectorRegistry) -> None:
        self.verdicts = self.counter(registry, "hubble_policy_verdicts_total", "Number of policy verdict events",
                                     ["direction", "match", "action"])

    def process(self, flow: Flow) -> None:
        etype = (flow.get("event_type") or {}).get("type")
        if etype == 5:
            match = MATCH_TYPE_NAMES.get(flow.get("policy_match_type", 0), "none")
        elif etype == 129 and flow.get("l7"):
            match = "l7/" + protocol_of(flow).lower()
        else:
            return
        self.verdicts.inc(*self.ctx.values(flow), str(flow.get("traffic_direction", "")).lower(), match,
                          str(flow.get("verdict", "")).lower())


class DnsHandler(Handler):
    """Counts flows carrying `l7.dns` records (from the DNS proxy, when it exists)."""

    name = "dns"

    def setup(self, registry: prom.CollectorRegistry) -> None:
        base = ["rcode", "qtypes", "ips_returned"]
        self.queries = self.counter(registry, "hubble_dns_queries_total", "Number of DNS queries observed", base)
        self.responses = self.counter(registry, "hubble_dns_responses_total", "Number of DNS responses observed",
                                      base)
        self.types = self.counter(registry, "hubble_dns_response_types_total", "Number of DNS response types",
                                  ["type", "qtypes"])

    def process(self, flow: Flow) -> None:
        l7 = flow.get("l7") or {}
        dns = l7.get("dns")
        if not dns:
            return
        qtypes = ",".join(dns.get("qtypes") or [])
        if "ignoreAAAA" in self.options and "AAAA" in qtypes.split(","):
            return
        ctx = self.ctx.values(flow)
        if l7.get("type") == "REQUEST":
            self.queries.inc(*ctx, "", qtypes, "0")
        elif l7.get("type") == "RESPONSE":
            ips = str(len(dns.get("ips") or []))
            self.responses.inc(*ctx, _RCODES.get(dns.get("rcode", 0), str(dns.get("rcode"))), qtypes, ips)
            for rrtype in dns.get("rrtypes") or []:
                self.types.inc(*ctx, rrtype, qtypes)


_RCODES = {0: "No Error", 1: "Format Error", 2: "Server Failure", 3: "Non-Existent Domain", 4: "Not Implemented",
           5: "Query Refused"}


class HttpHandler(Handler):
    """Counts flows carrying `l7.http` records (from the L7 proxy, when it exists)."""

    name = "http"

    def setup(self, registry: prom.CollectorRegistry) -> None:
        self.requests = self.counter(registry, "hubble_http_requests_total", "Count of HTTP requests",
                                     ["method", "protocol", "reporter"])
        self.responses = self.counter(registry, "hubble_http_responses_total", "Count of HTTP responses",
                                      ["method", "status", "reporter"])
        self.duration = (prom.Histogram("hubble_http_request_duration_seconds", "Quantiles of HTTP request duration",
                                       self.ctx.names + ["method", "reporter"], registry=registry))

    def process(self, flow: Flow) -> None:
        l7 = flow.get("l7") or {}
        http = l7.get("http")
        if not http:
            return
        reporter = "client" if flow.get("traffic_direction") == "EGRESS" else "server"
        ctx, method = self.ctx.values(flow), http.get("method", "")
        if l7.get("type") == "REQUEST":
            self.requests.inc(*ctx, method, http.get("protocol", ""), reporter)
        elif l7.get("type") == "RESPONSE":
            self.responses.inc(*ctx, method, str(http.get("code", 0)), reporter)
            if l7.get("latency_ns"):
                self.duration.labels(*ctx, method, reporter).observe(l7["latency_ns"] / 1e9)


HANDLERS: dict[str, type[Handler]] = {h.name: h for h in (FlowHandler, DropHandler, TcpHandler, IcmpHandler,
                                                         PortDistributionHandler, PolicyHandler, DnsHandler,
                                                         HttpHandler)}


class FlowMetrics:
    """The enabled handlers plus Hubble's core counters; a FlowSink of the observer."""

    def __init__(self, registry: prom.CollectorRegistry, enabled: str | list[str] = "") -> None:
        self.specs = parse_enabled(enabled) if enabled else []
        registry.register(_FlushOnScrape(self.flush))  # first: collected before the counters
        self.handlers = [HANDLERS[s.name](registry, s.options) for s in self.specs]
        self.lost = _Batched(prom.Counter("hubble_lost_events_total", "Number of lost events", ["source"],
                                          registry=registry))

    def process(self, flow: Flow) -> None:
        for h in self.handlers:
            h.process(flow)

    def count_lost(self, source: str, n: int) -> None:
        self.lost.add((source,), n)

    def flush(self) -> None:
        for h in self.handlers:
            for counter in h.batched:
                counter.flush()
        self.lost.flush()
