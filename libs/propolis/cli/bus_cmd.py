"""`propolis bus tail SUBJECT` and `propolis bus kv BUCKET [KEY]`: the bus, readable by people.

Payloads are msgpack on the wire; these verbs print one JSON object per line.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from nats.aio.msg import Msg

from propolis.bus import codec, relay, subjects
from propolis.bus.connection import Bus
from propolis.bus.kv import EventType
from propolis.cli.common import add_sandbox_flag, connect_bus, print_json, resolve_nats
from propolis.errors import CliError, TemporaryError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bus = sub.add_parser("bus", help="tail NATS subjects and read KV buckets as JSON")
    verbs = bus.add_subparsers(dest="bus_command", metavar="VERB", required=True)

    tail = verbs.add_parser("tail", help="print each message on SUBJECT (wildcards allowed) as one JSON line")
    tail.add_argument("subject", help="e.g. 'propolis.>' or 'propolis.v1.heartbeat.*.*'")
    tail.add_argument("--count", type=int, default=0, help="stop after N messages (0 = follow)")
    tail.add_argument("--timeout", type=float, default=0, help="stop after S seconds (0 = never)")
    tail.set_defaults(func=tail_cmd)

    kv = verbs.add_parser("kv", help="print a KV bucket's current contents (or one key) as JSON")
    kv.add_argument("bucket")
    kv.add_argument("key", nargs="?", help="one key, or a filter with wildcards (default: all)")
    kv.add_argument("--watch", action="store_true", help="keep printing updates")
    kv.set_defaults(func=kv_cmd)
    for p in (tail, kv):
        add_sandbox_flag(p)

    boot = verbs.add_parser("bootstrap", help="create every KV bucket (admin credentials; idempotent): the "
                                              "sandbox does this itself, the Helm chart's bootstrap Job runs it")
    boot.add_argument("--replicas", type=int, default=1, help="copies of each bucket on a NATS cluster")
    boot.add_argument("--wait", type=float, default=60.0, help="how long to wait for NATS to answer [s]")
    boot.set_defaults(func=bootstrap_cmd)

    mirrors = verbs.add_parser("relay-mirrors", help="keep a NATS relay's mirrors of every KV bucket in place "
                                                     "(admin credentials; runs until stopped): the chart's relay "
                                                     "pods run it beside their nats-server")
    mirrors.add_argument("--wait", type=float, default=60.0, help="how long to wait for the relay to answer [s]")
    mirrors.add_argument("--interval", type=float, default=relay.MIRROR_CHECK_INTERVAL_S,
                         help="seconds between two checks of the mirrors (default %(default)s)")
    mirrors.add_argument("--ready-file", type=Path, default=None,
                         help="a file that exists while every mirror has caught up with the hub (for a readiness "
                              "probe: clients must not sync from a mirror still filling)")
    mirrors.set_defaults(func=relay_mirrors_cmd)


async def tail_cmd(args: argparse.Namespace) -> int:
    bus = await connect_bus(args, "propolis-bus-tail")
    done = asyncio.Event()
    seen = 0

    async def on_msg(msg: Msg) -> None:  # raw subscription: show even what the codec would refuse
        nonlocal seen
        print_json({"subject": msg.subject, "time": time.time(), "data": codec.to_jsonable(msg.data)})
        sys.stdout.flush()
        seen += 1
        if args.count and seen >= args.count:
            done.set()

    await bus.subscribe_raw(args.subject, on_msg)
    try:
        if args.timeout:
            try:
                await asyncio.wait_for(done.wait(), args.timeout)
            except TimeoutError:
                pass
        else:
            await done.wait()
    finally:
        await bus.close()
    return 0


async def bootstrap_cmd(args: argparse.Namespace) -> int:
    url, user, password = resolve_nats(args)
    bus = Bus(url, name="propolis-bus-bootstrap", user=user, password=password)
    try:
        await bus.connect(max_wait=args.wait)
        await bus.ensure_buckets(replicas=args.replicas)
    except TemporaryError as exc:
        raise CliError(f"bootstrap buckets at {url}: {exc}") from exc
    finally:
        if bus.is_connected:
            await bus.close()
    print_json({"buckets": sorted(subjects.BUCKETS), "replicas": args.replicas})
    return 0


async def relay_mirrors_cmd(args: argparse.Namespace) -> int:
    url, user, password = resolve_nats(args)
    bus = Bus(url, name="propolis-relay-mirrors", user=user, password=password)
    try:
        await bus.connect(max_wait=args.wait)
        await relay.run_mirrors(bus, args.interval, ready_file=args.ready_file)
    except TemporaryError as exc:
        raise CliError(f"relay mirrors at {url}: {exc}") from exc
    finally:
        if bus.is_connected:
            await bus.close()
    return 0


async def kv_cmd(args: argparse.Namespace) -> int:
    bus = await connect_bus(args, "propolis-bus-kv")
    try:
        try:
            kv = await bus.kv(args.bucket)
        except TemporaryError as exc:
            raise CliError(str(exc)) from exc
        keys = args.key or ">"

        def show(key: str, op: EventType, revision: int, value: object) -> None:
            shown = None if value is None else {"_schema": getattr(type(value), "SCHEMA", "?"), **codec.as_dict(value)}
            print_json({"key": key, "op": op.value, "revision": revision, "value": shown})
            sys.stdout.flush()

        if not args.watch:  # a snapshot: direct gets, no consumer left behind
            for key, entry in sorted((await kv.items(keys)).items()):
                show(key, EventType.PUT, entry.revision, entry.value)
            return 0
        async for ev in kv.watch(keys):
            if ev.type is not EventType.SYNCED:
                show(ev.key, ev.type, ev.revision, ev.value)
    finally:
        await bus.close()
    return 0
