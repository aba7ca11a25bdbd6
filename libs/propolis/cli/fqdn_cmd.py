"""`propolis fqdn cache list`, like `cilium fqdn cache list`: what each node's dns-proxy learned.

Read from `PROPOLIS_FQDN_V1` (one record per node, the dns-proxy's own key), so it shows exactly what
the datapath-writers compile toFQDNs selectors against.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from propolis.bus import subjects
from propolis.bus.messages import FqdnCacheRecord
from propolis.cli.common import add_output_flag, add_sandbox_flag, connect_bus, print_json, print_table
from propolis.errors import CliError, TemporaryError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fqdn = sub.add_parser("fqdn", help="DNS-based policy (toFQDNs): what the dns-proxies learned")
    verbs = fqdn.add_subparsers(dest="fqdn_command", metavar="VERB", required=True)
    cache = verbs.add_parser("cache", help="the FQDN cache")
    cache_verbs = cache.add_subparsers(dest="fqdn_cache_command", metavar="VERB", required=True)
    ls = cache_verbs.add_parser("list", help="every learned name and address, per node (cilium fqdn cache list)")
    ls.add_argument("--node", default="", help="only this node")
    ls.add_argument("-n", "--matchpattern", default="", help="only names this matchPattern selects")
    add_output_flag(ls)
    add_sandbox_flag(ls)
    ls.set_defaults(func=cache_list)


async def learned_records(args: argparse.Namespace) -> list[FqdnCacheRecord]:
    """Every node's FQDN cache record (only `args.node`'s when set)."""
    node = getattr(args, "node", "")
    bus = await connect_bus(args)
    try:
        try:
            kv = await bus.kv(subjects.FQDN_BUCKET)
        except TemporaryError as exc:
            raise CliError(f"{exc} (is the sandbox up?)") from exc
        items = await kv.items(subjects.fqdn_key(node) if node else ">")
    finally:
        await bus.close()
    return sorted((e.value for e in items.values() if isinstance(e.value, FqdnCacheRecord)), key=lambda r: r.node)


async def cache_list(args: argparse.Namespace) -> int:
    from propolis.model.matchpattern import FqdnSelector

    try:
        wanted = FqdnSelector(match_pattern=args.matchpattern) if args.matchpattern else None
    except ValueError as exc:
        raise CliError(f"--matchpattern: {exc}") from None
    rows: list[dict[str, Any]] = []
    for record in await learned_records(args):
        for entry in record.entries:
            if wanted is None or wanted.matches(str(entry.get("name", ""))):
                rows.append({"node": record.node, **entry})
    if args.output == "json":
        print_json(rows)
        return 0
    now = time.time()
    print_table(["NODE", "FQDN", "TTL", "EXPIRES IN", "ZOMBIE", "IP"],
                [[r["node"], r["name"], r["ttl"], f"{max(0.0, r['expires_at'] - now):.0f}s",
                  "yes" if r.get("zombie") else "no", r["ip"]] for r in rows])
    return 0
