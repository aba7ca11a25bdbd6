"""`propolis identity list|get` and `propolis endpoint list`, like `cilium identity list|endpoint list`.

`endpoint list` joins the identities bucket (every pod's endpoint record) with what each node's
datapath-writer reports in its heartbeat (`writer/endpoint_state.py`): policy enforcement per
direction and the endpoint's state (ready / regenerating / not-ready with the reason).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from typing import Any

from propolis.bus import subjects
from propolis.bus.messages import EndpointRecord, Heartbeat, IdentityRecord
from propolis.cli.common import add_output_flag, add_sandbox_flag, connect_bus, print_json, print_table
from propolis.errors import CliError, TemporaryError
from propolis.status import is_live, read_heartbeats
from propolis.writer import endpoint_state


def register(sub: argparse._SubParsersAction) -> None:
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
    for p in (ls, get, els):
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


def _row(rec: IdentityRecord, refs: Counter[int]) -> dict[str, object]:
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
                     "policyEnforcement": {"ingress": "Enabled" if st.get("ingress") else "Disabled",
                                           "egress": "Enabled" if st.get("egress") else "Disabled"},
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
