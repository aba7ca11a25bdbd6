"""`propolis observe`: `hubble observe` for Propolis — same flags, filters and output formats.

Where the flows come from: `--server URL` (or $PROPOLIS_HUBBLE_SERVER) names a hubble-relay;
otherwise the relay advertised in the bus's heartbeats (service `hubble-relay`,
progress `relay_url`) is used; without a relay (or with `--server nats`) this command asks the
nodes' observers over NATS itself, exactly as the relay would.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from propolis.bus.messages import FlowQuery
from propolis.cli.common import add_sandbox_flag, connect_bus
from propolis.errors import CliError, ValidationError
from propolis.hubble.client import BusFlowSource, announced_relay, parse_time
from propolis.hubble.filters import FlowMatcher
from propolis.hubble.observe_args import add_filter_flags, build_filters
from propolis.hubble.printer import FORMATS, Printer

DEFAULT_LAST = 20
ALL = 1 << 30


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("observe", help="observe flows (the flags of `hubble observe`)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_filter_flags(p)
    p.add_argument("--since", default="", help="flows since this time (RFC 3339) or duration ago (5m, 1h)")
    p.add_argument("--until", default="", help="flows until this time (RFC 3339) or duration ago")
    p.add_argument("--last", type=int, default=0, help=f"the last N flows (default {DEFAULT_LAST} without --follow)")
    p.add_argument("--first", type=int, default=0, help="the first N flows still held")
    p.add_argument("--all", action="store_true", help="every flow still held in the nodes' ring buffers")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new flows")
    p.add_argument("-o", "--output", choices=FORMATS, default="compact")
    p.add_argument("--print-node-name", action="store_true", help="print the node each flow was observed on")
    p.add_argument("--server", default=os.environ.get("PROPOLIS_HUBBLE_SERVER", ""),
                   help="hubble-relay URL ($PROPOLIS_HUBBLE_SERVER; 'nats' = ask the observers over NATS; "
                        "default: the relay announced on the bus, else NATS)")
    p.add_argument("--timeout", type=float, default=0, help="stop following after S seconds (0 = never)")
    add_sandbox_flag(p)
    p.set_defaults(func=observe_cmd)


def request_doc(args: argparse.Namespace) -> dict[str, Any]:
    """The relay request (and the NATS query) from the flags."""
    try:
        allow, deny = build_filters(args.filter_ops)
        FlowMatcher(allow, deny)
        since, until = parse_time(args.since), parse_time(args.until)
    except (ValidationError, ValueError) as exc:
        raise CliError(f"invalid filter: {exc}", exit_code=2) from exc
    if args.first and args.last:
        raise CliError("--first and --last exclude each other")
    number = ALL if args.all else args.first or args.last
    if not number and not args.follow and not since and not until:
        number = DEFAULT_LAST
    return {"whitelist": allow, "blacklist": deny, "number": number, "first": bool(args.first),
            "follow": args.follow, "since": since, "until": until}


async def _relay_url(args: argparse.Namespace) -> str:
    """The relay to use: --server, else one announced in the heartbeats; '' = go over NATS."""
    if args.server:
        return "" if args.server == "nats" else args.server.rstrip("/")
    try:
        bus = await connect_bus(args, "propolis-observe")
    except CliError:
        return ""
    try:
        return await announced_relay(bus)
    except Exception:  # noqa: BLE001 - no heartbeats bucket or no permission: fall back to NATS
        return ""
    finally:
        await bus.close()


async def _from_relay(url: str, doc: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            async with session.post(f"{url}/api/v1/flows", json=doc) as resp:
                if resp.status != 200:
                    raise CliError(f"relay {url}: {resp.status} {await resp.text()}")
                async for line in resp.content:
                    if line.strip():
                        yield orjson.loads(line)
        except aiohttp.ClientConnectionError as exc:
            raise CliError(f"relay {url} unreachable: {exc}") from exc


async def _from_nats(args: argparse.Namespace, doc: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    bus = await connect_bus(args, "propolis-observe")
    try:
        query = FlowQuery(whitelist=doc["whitelist"], blacklist=doc["blacklist"], number=doc["number"],
                          first=doc["first"], since=doc["since"], until=doc["until"])
        async for item in BusFlowSource(bus).stream(query, follow=doc["follow"]):
            yield item
    finally:
        await bus.close()


async def _reachable(url: str) -> bool:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            async with session.get(f"{url}/healthz") as resp:
                return resp.status == 200
    except (TimeoutError, aiohttp.ClientError):
        return False


async def relay_for(args: argparse.Namespace) -> str:
    """The relay to use ('' = NATS): `--server`, else the announced one if it answers."""
    url = await _relay_url(args)
    if url and not args.server and not await _reachable(url):
        return ""  # announced but gone (its heartbeat has not expired yet): ask the observers directly
    return url


async def observe_cmd(args: argparse.Namespace) -> int:
    doc = request_doc(args)
    printer = Printer(args.output, node_name=args.print_node_name)
    url = await relay_for(args)
    source = _from_relay(url, doc) if url else _from_nats(args, doc)

    async def run() -> None:
        async for item in source:
            printer.write(item)
            if args.follow:
                printer.flush()

    try:
        if args.timeout:
            await asyncio.wait_for(run(), args.timeout)
        else:
            await run()
    except TimeoutError:
        pass
    except BrokenPipeError:
        return 0
    finally:
        sys.stdout.flush()
    return 0
