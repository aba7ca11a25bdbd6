"""`propolis identity list|get` and `propolis endpoint list|config`, like `cilium identity list|endpoint list|config`.

`endpoint list` joins the identities bucket (every pod's endpoint record) with what each node's
datapath-writer reports in its heartbeat (`writer/endpoint_state.py`): policy enforcement per
direction and the endpoint's state (ready / regenerating / not-ready with the reason).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from typing import Any, TypedDict

from propolis.bus import subjects
from propolis.bus.messages import EndpointConfig, EndpointRecord, Heartbeat, IdentityRecord
from propolis.cli.common import add_output_flag, add_sandbox_flag, connect_bus, print_json, print_table
from propolis.errors import CliError, TemporaryError
from propolis.runtime.heartbeats import is_live, read_heartbeats
from propolis.writer import endpoint_state


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ident = sub.add_parser("identity", help="security identities")
    verbs = ident.add_subparsers(dest="identity_command", metavar="VERB", required=True)
    ls = verbs.add_parser("list", help="every identity with its labels and reference count")
    add_output_flag(ls)
    ls.set_defaults(func=identity_list)
    get = verbs.add_parser("get", help="one identity")
    get.add_argument("id", type=int)
    add_output_flag(get)
    get.set_defaults(func=identity_get)

    ep = sub.add_parser("endpoint", help="endpoints (pods) and their identities")
    everbs = ep.add_subparsers(dest="endpoint_command", metavar="VERB", required=True)
    els = everbs.add_parser("list", help="every endpoint: policy enforcement, identity, labels, IPv4, state")
    add_output_flag(els)
    els.set_defaults(func=endpoint_list)
    ecfg = everbs.add_parser("config", help="show or change an endpoint's options (cilium endpoint config), "
                                            "e.g. PolicyAuditMode=Enabled")
    ecfg.add_argument("endpoint", metavar="NS/POD|node:NAME")
    ecfg.add_argument("options", nargs="*", metavar="OPTION=VALUE")
    add_output_flag(ecfg)
    ecfg.set_defaults(func=endpoint_config_cmd)
    for p in (ls, get, els, ecfg):
        add_sandbox_flag(p)


async def _load(args: argparse.Namespace,
                heartbeats: list[Heartbeat] | None = None) -> tuple[dict[int, IdentityRecord], list[EndpointRecord]]:
    """Identities and endpoint records (and, when a list is given, every heartbeat into it)."""
    bus = await connect_bus(args)
    try:
        try:
            kv = await bus.kv(subjects.IDENTITIES_BUCKET)
        except TemporaryError as exc:
            raise CliError(f"{exc} (is the identity-allocator running?)") from exc
        items = await kv.items()
        if heartbeats is not None:
            heartbeats.extend(await read_heartbeats(bus))
    finally:
        await bus.close()
    ids = {e.value.id: e.value for e in items.values() if isinstance(e.value, IdentityRecord)}
    eps = sorted((e.value for e in items.values() if isinstance(e.value, EndpointRecord)),
                 key=lambda r: (r.namespace, r.name))
    return ids, eps


class IdentityRow(TypedDict):
    """One row of `identity list/get` (also its JSON shape)."""

    id: int
    labels: list[str]
    reserved: bool
    references: int


def _row(rec: IdentityRecord, refs: Counter[int]) -> IdentityRow:
    return {"id": rec.id, "labels": rec.labels, "reserved": rec.reserved, "references": refs.get(rec.id, 0)}


async def identity_list(args: argparse.Namespace) -> int:
    ids, eps = await _load(args)
    refs = Counter(e.identity for e in eps)
    rows = [_row(ids[i], refs) for i in sorted(ids)]
    if args.output == "json":
        print_json(rows)
        return 0
    table = []
    for r in rows:
        labels = r["labels"] or ["-"]
        table.append([r["id"], labels[0], r["references"]])
        table += [["", lbl, ""] for lbl in labels[1:]]
    print_table(["ID", "LABELS", "REFS"], table)
    return 0


async def identity_get(args: argparse.Namespace) -> int:
    ids, eps = await _load(args)
    if args.id not in ids:
        raise CliError(f"identity {args.id} not found")
    row = _row(ids[args.id], Counter(e.identity for e in eps))
    if args.output == "json":
        print_json(row)
    else:
        print_table(["ID", "LABELS", "REFS"], [[row["id"], lbl, row["references"]] for lbl in row["labels"]])
    return 0


def writer_states(heartbeats: list[Heartbeat], now: float) -> dict[str, dict[str, Any]]:
    """Node -> "ns/pod" -> state, from each node's newest live datapath-writer heartbeat."""
    out: dict[str, dict[str, Any]] = {}
    for hb in sorted(heartbeats, key=lambda h: h.sent_at):
        if hb.service == "datapath-writer" and is_live(hb, now):
            states = hb.progress.get(endpoint_state.PROGRESS_KEY)
            out[hb.node] = states if isinstance(states, dict) else {}
    return out


def enforcement_name(state: dict[str, Any], direction: str) -> str:
    """Cilium's words: an enforced direction in audit mode drops nothing, hence "Disabled (Audit)"."""
    if not state.get(direction):
        return "Disabled"
    return "Disabled (Audit)" if state.get("audit") else "Enabled"


def endpoint_rows(eps: list[EndpointRecord], states: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for e in eps:
        reported = states.get(e.node)
        st = (reported or {}).get(f"{e.namespace}/{e.name}")
        if not isinstance(st, dict):
            why = ("its node's datapath-writer has not written it yet" if reported is not None else
                   f"no live datapath-writer on node {e.node or '(unscheduled)'}")
            st = {"state": endpoint_state.NOT_READY, "reason": why}
        rows.append({"namespace": e.namespace, "pod": e.name, "node": e.node, "endpointID": st.get("id"),
                     "identity": e.identity, "labels": list(e.labels), "ipv4": [ip for ip in e.ips if ":" not in ip],
                     "policyEnforcement": {"ingress": enforcement_name(st, "ingress"),
                                           "egress": enforcement_name(st, "egress")},
                     "state": st.get("state"), "reason": st.get("reason", "")})
    return rows


async def endpoint_list(args: argparse.Namespace) -> int:
    heartbeats: list[Heartbeat] = []
    _, eps = await _load(args, heartbeats)
    rows = endpoint_rows(eps, writer_states(heartbeats, time.time()))
    if args.output == "json":
        print_json(rows)
        return 0
    table = []
    for r in rows:
        labels = [lbl for lbl in r["labels"] if "namespace.labels" not in lbl] or ["-"]
        state = r["state"] + (f" ({r['reason']})" if r["reason"] else "")
        table.append([r["endpointID"] if r["endpointID"] is not None else "-", f"{r['namespace']}/{r['pod']}",
                      r["policyEnforcement"]["ingress"], r["policyEnforcement"]["egress"], r["identity"],
                      labels[0], ",".join(r["ipv4"]), r["node"], state])
        table += [["", "", "", "", "", lbl, "", "", ""] for lbl in labels[1:]]
    print_table(["ENDPOINT", "POD", "POLICY (ingress) ENFORCEMENT", "POLICY (egress) ENFORCEMENT", "IDENTITY",
                 "LABELS (source:key[=value])", "IPv4", "NODE", "STATUS"], table)
    return 0


def parse_endpoint_options(endpoint: str, options: list[str]) -> tuple[str, str, dict[str, str]]:
    """NS/POD (a pod's endpoint) or node:NAME (the node's host endpoint: namespace and pod empty)."""
    namespace, slash, pod = ("", "/", "") if endpoint.startswith("node:") else endpoint.partition("/")
    if not (slash and (namespace and pod or endpoint.startswith("node:"))):
        raise CliError(f"endpoint {endpoint!r}: give it as NAMESPACE/POD or node:NAME")
    parsed: dict[str, str] = {}
    for opt in options:
        name, eq, value = opt.partition("=")
        if not (eq and name and value):
            raise CliError(f"option {opt!r}: give it as OPTION=VALUE (e.g. PolicyAuditMode=Enabled)")
        parsed[name] = value
    return namespace, pod, parsed


async def endpoint_config_cmd(args: argparse.Namespace) -> int:
    """Ask the datapath-writer of the pod's node (it owns the endpoint) to show or change its options."""
    namespace, pod, options = parse_endpoint_options(args.endpoint, args.options)
    if pod:
        _, eps = await _load(args)
        record = next((e for e in eps if (e.namespace, e.name) == (namespace, pod)), None)
        if record is None or not record.node:
            raise CliError(f"endpoint {namespace}/{pod} not found (is the pod scheduled and wired?)")
        node = record.node
    else:
        node = args.endpoint.removeprefix("node:")
    bus = await connect_bus(args)
    try:
        reply = await bus.request(subjects.endpoint_config_subject(node),
                                  EndpointConfig(namespace, pod, options), timeout=10.0)
    except Exception as exc:  # timeouts and no-responders alike
        raise CliError(f"endpoint {args.endpoint}: no answer from the datapath-writer of node {node} ({exc})") from exc
    finally:
        await bus.close()
    if not isinstance(reply, EndpointConfig):
        raise CliError(f"endpoint {args.endpoint}: unexpected answer {reply!r}")
    if reply.error:
        raise CliError(f"endpoint {args.endpoint}: {reply.error}")
    if args.output == "json":
        print_json({"endpoint": args.endpoint, "node": node, "options": reply.options})
    else:
        print_table(["OPTION", "VALUE"], sorted(reply.options.items()))
    return 0
