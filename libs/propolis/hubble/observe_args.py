"""`hubble observe`'s filter flags -> allow and deny lists of FlowFilters, as Hubble builds them.

Flags combine like Hubble's: the same flag repeated adds alternatives (OR), different flags must
all hold (AND). Flags that name both ends (`--pod`, `--ip`, `--label`, `--namespace`, …) mean
"either end": they make two filters, one with the source and one with the destination field,
both carrying every other flag. `--not` negates the filter flag that follows it: negated flags
build the deny list the same way. `--namespace N` is the pod filter `N/`, so with `--pod` it adds an
alternative (as in Hubble); `--pod N/name` names a pod in a namespace, `--pod /name` in any.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from propolis.hubble.filters import FlowFilter

#: flag -> (field of the source end, field of the destination end) for "either end" flags
EITHER_END = {
    "pod": ("source_pod", "destination_pod"),
    "namespace": ("source_pod", "destination_pod"),
    "ip": ("source_ip", "destination_ip"),
    "label": ("source_label", "destination_label"),
    "identity": ("source_identity", "destination_identity"),
    "service": ("source_service", "destination_service"),
    "port": ("source_port", "destination_port"),
    "workload": ("source_workload", "destination_workload"),
    "fqdn": ("source_fqdn", "destination_fqdn"),
}
#: flag -> field, for flags about one end or about the flow as a whole
ONE_FIELD = {
    "from-pod": "source_pod", "to-pod": "destination_pod",
    "from-namespace": "source_pod", "to-namespace": "destination_pod",
    "from-ip": "source_ip", "to-ip": "destination_ip",
    "from-label": "source_label", "to-label": "destination_label",
    "from-identity": "source_identity", "to-identity": "destination_identity",
    "from-service": "source_service", "to-service": "destination_service",
    "from-port": "source_port", "to-port": "destination_port",
    "from-workload": "source_workload", "to-workload": "destination_workload",
    "from-fqdn": "source_fqdn", "to-fqdn": "destination_fqdn",
    "verdict": "verdict", "type": "event_type", "protocol": "protocol", "node-name": "node_name",
    "http-status": "http_status_code", "http-method": "http_method", "http-path": "http_path",
    "traffic-direction": "traffic_direction", "tcp-flags": "tcp_flags", "drop-reason-desc": "drop_reason_desc",
    "uuid": "uuid",
}
#: value-less flag -> (field, value): Hubble's `--encrypted` / `--unencrypted` (WireGuard or IPsec)
SWITCHES = {"encrypted": ("encrypted", True), "unencrypted": ("encrypted", False)}
HELP = {
    "pod": "flows from or to pods with this name prefix ([namespace/]<name>; '/name' = any namespace)",
    "namespace": "flows from or to pods in this namespace",
    "ip": "flows from or to this IP or CIDR", "label": "flows from or to endpoints matching this label selector",
    "identity": "flows from or to this security identity", "service": "flows from or to this service ([ns/]name)",
    "port": "flows from or to this L4 port", "workload": "flows from or to this workload ([kind/]name)",
    "fqdn": "flows from or to this DNS name (pattern)",
    "verdict": "FORWARDED, DROPPED, ERROR, AUDIT, REDIRECTED",
    "type": "event type: trace, drop, policy-verdict, l7 (type:subtype allowed)",
    "protocol": "TCP, UDP, ICMPv4, SCTP; DNS, HTTP … once L7 flows exist",
    "node-name": "node name or glob (e.g. 'sandbox-worker*')", "http-status": "HTTP status code, or class like 5+",
    "http-method": "HTTP method", "http-path": "HTTP path regex", "traffic-direction": "ingress or egress",
    "tcp-flags": "TCP flags that must all be set, e.g. SYN or SYN,ACK", "drop-reason-desc": "e.g. POLICY_DENIED",
    "encrypted": "flows that crossed nodes encrypted (IP.encrypted)",
    "unencrypted": "flows that were not encrypted",
}
_TRANSFORM: dict[str, Callable[[str], str]] = {
    "namespace": lambda v: f"{v}/", "from-namespace": lambda v: f"{v}/", "to-namespace": lambda v: f"{v}/",
    "verdict": str.upper, "traffic-direction": str.upper}


@dataclass
class _Tracker:
    """Hubble's filter tracker: fields for both filters, the source-only and destination-only ones."""

    both: dict[str, list[Any]] = field(default_factory=dict)
    left: dict[str, list[Any]] = field(default_factory=dict)
    right: dict[str, list[Any]] = field(default_factory=dict)
    touched: bool = False

    def add(self, flag: str, value: Any) -> None:
        self.touched = True
        transform = _TRANSFORM.get(flag)
        if transform is not None:
            value = transform(value)
        if flag in SWITCHES:
            name, value = SWITCHES[flag]
            self.both.setdefault(name, []).append(value)
        elif flag in EITHER_END:
            src, dst = EITHER_END[flag]
            self.left.setdefault(src, []).append(value)
            self.right.setdefault(dst, []).append(value)
        else:
            self.both.setdefault(ONE_FIELD[flag], []).append(value)

    def filters(self) -> list[FlowFilter]:
        if not self.touched:
            return []

        def merged(side: dict[str, list[Any]]) -> FlowFilter:
            out = {k: list(v) for k, v in self.both.items()}
            for k, v in side.items():
                out.setdefault(k, []).extend(v)
            return out

        if not self.right:
            return [merged(self.left)]
        left, right = merged(self.left), merged(self.right)
        return [left] if left == right else [left, right]


class _FilterAction(argparse.Action):
    """Records (flag, value, negated) in order; `--not` negates the next one."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        ops = getattr(ns, "filter_ops", None) or []
        ops.append((self.dest, values, bool(getattr(ns, "negate_next", False))))
        ns.filter_ops = ops
        ns.negate_next = False


class _NotAction(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        ns.negate_next = True


def add_filter_flags(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(filter_ops=[], negate_next=False)
    parser.add_argument("--not", nargs=0, action=_NotAction, help="negate the next filter flag")
    for flag in (*EITHER_END, *ONE_FIELD):
        base = flag.split("-", 1)[1] if flag.startswith(("from-", "to-")) else flag
        text = HELP.get(flag) or f"{'source' if flag.startswith('from-') else 'destination'} end only: " \
                                 f"{HELP.get(base, base)}"
        short = {"namespace": ["-n"], "type": ["-t"]}.get(flag, [])
        parser.add_argument(*short, f"--{flag}", dest=flag, action=_FilterAction, metavar="VALUE", help=text)
    for flag in SWITCHES:
        parser.add_argument(f"--{flag}", dest=flag, action=_FilterAction, nargs=0, help=HELP[flag])


def build_filters(ops: list[tuple[str, Any, bool]]) -> tuple[list[FlowFilter], list[FlowFilter]]:
    """(allow, deny) from the recorded flag operations."""
    allow, deny = _Tracker(), _Tracker()
    for flag, value, negated in ops:
        (deny if negated else allow).add(flag, value)
    return allow.filters(), deny.filters()
