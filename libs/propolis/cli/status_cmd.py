"""`propolis status`: one screen that says whether the cluster is healthy (like `cilium status`)."""

from __future__ import annotations

import argparse
import asyncio
import time

from propolis.cli.common import add_output_flag, connect_bus, print_json
from propolis.status import StatusReport, collect


def register(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser("status", help="health of every service, NATS, Kubernetes and every feature")
    st.add_argument("--wait", action="store_true", help="block until healthy (see --wait-duration)")
    st.add_argument("--wait-duration", type=float, default=120.0, help="give up waiting after S seconds")
    st.add_argument("--stale-after", type=float, default=10.0,
                    help="an instance without a heartbeat for S seconds is unhealthy")
    add_output_flag(st)
    st.set_defaults(func=status_cmd)


async def status_cmd(args: argparse.Namespace) -> int:
    bus = await connect_bus(args, "propolis-status")
    try:
        deadline = time.monotonic() + args.wait_duration
        while True:
            rep = await collect(bus, stale_after=args.stale_after)
            if rep.healthy or not args.wait or time.monotonic() >= deadline:
                break
            await asyncio.sleep(1.0)
    finally:
        await bus.close()
    if args.output == "json":
        print_json(rep.as_dict())
    else:
        render(rep)
    return 0 if rep.healthy else 1


def render(rep: StatusReport) -> None:
    ok = "OK" if rep.healthy else "UNHEALTHY"
    js = rep.nats.get("jetstream", {})
    print(f"Cluster:            {ok}")
    print(f"NATS:               {'OK' if rep.nats.get('connected') else 'Disconnected'}   {rep.nats.get('url')}  "
          f"server {rep.nats.get('server_version')}, JetStream {js.get('streams')} streams")
    k = rep.kubernetes
    print(f"Kubernetes:         {'OK' if k.get('watchers') else 'no k8s-watcher'}   nodes: "
          f"{', '.join(k.get('nodes') or []) or '-'}   mirrored resourceVersion {k.get('resource_version')}")
    for name, f in rep.features.items():
        detail = f.get("reason") or f.get("detail") or ""
        print(f"{name + ':':<20}{f.get('state', '?')}{'   ' + detail if detail else ''}")
    missing = [f"{n} ({v['detail']})" for n, v in rep.kernel.items() if not v["available"]]
    if missing:
        print(f"{'Kernel lacks:':<20}{'; '.join(missing)}")
    print()
    print(f"{'SERVICE':<20} {'NODE':<22} {'VERSION':<8} {'UPTIME':>8}  HEALTH")
    for s in rep.services:
        print(f"{s['service']:<20} {s['node']:<22} {s['version']:<8} {s['uptime_s']:>7.0f}s  {s['health']}"
              + (f"  ({'; '.join(s['reasons'])})" if s["reasons"] else ""))
    if rep.problems:
        print()
        print("Problems:")
        for p in rep.problems:
            print(f"  - {p}")
