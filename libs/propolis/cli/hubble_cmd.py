"""`propolis hubble status|nodes`: what `hubble status` and `hubble list nodes` show, from the relay
(found like `propolis observe` finds it) or straight from the observers over NATS."""

from __future__ import annotations

import argparse
import os
from typing import Any

import aiohttp

from propolis.bus.messages import FlowQuery
from propolis.cli.common import add_sandbox_flag, connect_bus, print_json, print_table
from propolis.cli.observe_cmd import relay_for
from propolis.errors import CliError
from propolis.hubble.client import BusFlowSource


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    hubble = sub.add_parser("hubble", help="Hubble status and nodes (`hubble status`, `hubble list nodes`)")
    verbs = hubble.add_subparsers(dest="hubble_command", metavar="VERB", required=True)
    for name, func, text in (("status", status_cmd, "flows held, seen, nodes connected"),
                             ("nodes", nodes_cmd, "each node's observer and its ring buffer")):
        p = verbs.add_parser(name, help=text)
        p.add_argument("--server", default=os.environ.get("PROPOLIS_HUBBLE_SERVER", ""),
                       help="hubble-relay URL ('nats' = ask the observers over NATS)")
        p.add_argument("-o", "--output", choices=["table", "json"], default="table")
        add_sandbox_flag(p)
        p.set_defaults(func=func)


async def fetch_status(args: argparse.Namespace) -> dict[str, Any]:
    url = await relay_for(args)
    if url:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
                async with http.get(f"{url}/api/v1/status") as resp:
                    return {"via": url, **(await resp.json())}
        except aiohttp.ClientError as exc:
            raise CliError(f"relay {url} unreachable: {exc}") from exc
    bus = await connect_bus(args, "propolis-hubble-status")
    try:
        source = BusFlowSource(bus)
        await source.historic(FlowQuery(number=1))
        st = source.last_status
    finally:
        await bus.close()
    return {"via": "nats", "num_flows": st["num_flows"], "max_flows": st["max_flows"],
            "seen_flows": st["seen_flows"], "num_connected_nodes": len(st["nodes"]),
            "num_unavailable_nodes": len(st["unavailable"]), "connected_nodes": st["nodes"],
            "unavailable_nodes": st["unavailable"], "nodes": st["per_node"]}


async def status_cmd(args: argparse.Namespace) -> int:
    st = await fetch_status(args)
    if args.output == "json":
        print_json(st)
        return 0
    total = st["num_connected_nodes"] + st["num_unavailable_nodes"]
    fill = 100 * st["num_flows"] / st["max_flows"] if st["max_flows"] else 0.0
    print(f"Healthcheck (via {st['via']}): {'Ok' if st['num_connected_nodes'] else 'no observer answered'}")
    print(f"Current/Max Flows: {st['num_flows']:,}/{st['max_flows']:,} ({fill:.2f}%)")
    print(f"Seen Flows: {st['seen_flows']:,}")
    print(f"Connected Nodes: {st['num_connected_nodes']}/{total}")
    if st["unavailable_nodes"]:
        print(f"Unavailable Nodes: {', '.join(st['unavailable_nodes'])}")
    return 0 if st["num_connected_nodes"] else 1


async def nodes_cmd(args: argparse.Namespace) -> int:
    st = await fetch_status(args)
    rows = [{"name": n["name"], "status": "Connected", "flows": f"{n['num_flows']:,}/{n['max_flows']:,}",
             "seen": n["seen_flows"]} for n in st.get("nodes", [])]
    rows += [{"name": n, "status": "Unavailable", "flows": "", "seen": ""} for n in st["unavailable_nodes"]]
    if args.output == "json":
        print_json(rows)
    else:
        print_table(["NAME", "STATUS", "FLOWS", "SEEN"], [[r["name"], r["status"], r["flows"], r["seen"]]
                                                          for r in rows])
    return 0
