"""`propolis identity list|get` and `propolis endpoint list`, like `cilium identity list`."""

from __future__ import annotations

import argparse
from collections import Counter

from propolis.bus import subjects
from propolis.bus.messages import EndpointRecord, IdentityRecord
from propolis.cli.common import add_output_flag, add_sandbox_flag, connect_bus, print_json, print_table
from propolis.errors import CliError, TemporaryError


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
    els = everbs.add_parser("list", help="pod, IP, node, identity")
    add_output_flag(els)
    els.set_defaults(func=endpoint_list)
    for p in (ls, get, els):
        add_sandbox_flag(p)


async def _load(args: argparse.Namespace) -> tuple[dict[int, IdentityRecord], list[EndpointRecord]]:
    bus = await connect_bus(args)
    try:
        try:
            kv = await bus.kv(subjects.IDENTITIES_BUCKET)
        except TemporaryError as exc:
            raise CliError(f"{exc} (is the identity-allocator running?)") from exc
        items = await kv.items()
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


async def endpoint_list(args: argparse.Namespace) -> int:
    _, eps = await _load(args)
    if args.output == "json":
        print_json([{f: getattr(e, f) for f in EndpointRecord._FIELDS} for e in eps])  # type: ignore[attr-defined]
        return 0
    print_table(["NAMESPACE", "POD", "IPV4", "NODE", "IDENTITY"],
                [[e.namespace, e.name, ",".join(e.ips), e.node, e.identity] for e in eps])
    return 0
