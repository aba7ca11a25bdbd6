"""`propolis status`: one screen that says whether the cluster is healthy (like `cilium status`).

Exit code 0 when healthy, 1 when anything is unhealthy (after ``--wait``, when
it gave up), so scripts and CI can gate on it.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from propolis.bus.connection import Bus
from propolis.cli.common import add_output_flag, add_sandbox_flag, connect_bus, print_json, print_table
from propolis.errors import CliError
from propolis.status import StatusReport, collect

T = TypeVar("T")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    st = sub.add_parser("status", help="health of every service, NATS, Kubernetes and every feature")
    add_sandbox_flag(st)
    st.add_argument("--wait", action="store_true", help="block until healthy (see --wait-duration)")
    st.add_argument("--wait-duration", type=float, default=120.0, metavar="S", help="give up waiting after S seconds")
    st.add_argument("--timeout", type=float, default=20.0, metavar="S",
                    help="fail when NATS does not answer one report within S seconds (a hard limit)")
    st.add_argument("--stale-after", type=float, default=None, metavar="S",
                    help="an instance without a heartbeat for S seconds is unhealthy "
                         "(default: 3 of its own heartbeat intervals)")
    add_output_flag(st)
    st.set_defaults(func=status_cmd)


async def status_cmd(args: argparse.Namespace) -> int:
    async def first() -> tuple[Bus, StatusReport]:
        bus = await connect_bus(args, "propolis-status")
        try:
            return bus, await collect(bus, stale_after=args.stale_after)
        except BaseException:
            await bus.close(timeout=0.5)
            raise

    deadline = time.monotonic() + args.wait_duration
    bus, rep = await _within(args.timeout, first())  # --timeout bounds connect + report, then each --wait round
    try:
        while args.wait and not rep.healthy and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            rep = await _within(args.timeout, collect(bus, stale_after=args.stale_after))
    finally:
        await bus.close(timeout=1.0)
    if args.output == "json":
        print_json(rep.as_dict())
    else:
        render(rep)
    return 0 if rep.healthy else 1


async def _within(seconds: float, work: Awaitable[T]) -> T:
    try:
        return await asyncio.wait_for(work, seconds)
    except TimeoutError:
        raise CliError(f"NATS did not answer within {seconds:g}s (--timeout)") from None


def duration(seconds: float) -> str:
    """Uptime as people read it: 42s, 5m12s, 3h04m, 2d03h."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _line(label: str, state: str, detail: Any = "") -> None:
    print(f"{label + ':':<22}{state}{'   ' + str(detail) if detail else ''}")


def render(rep: StatusReport) -> None:
    _line("Cluster", "OK" if rep.healthy else f"UNHEALTHY ({len(rep.problems)} problem{'s' * (len(rep.problems) > 1)})")
    n, js = rep.nats, rep.nats.get("jetstream", {})
    _line("NATS", "OK" if n.get("connected") else "Disconnected", f"{n.get('url')}  server {n.get('server_version')}")
    _line("JetStream", js.get("state", "?"), js.get("reason") or
          f"{js.get('streams')} streams, {js.get('consumers')} consumers, "
          f"{(js.get('storage_bytes') or 0) / 1024:.0f} KiB stored")
    k = rep.kubernetes
    nodes = k.get("nodes") or []
    _line("Kubernetes", k.get("state", "?"),
          k.get("reason") or f"{len(nodes)} nodes ({', '.join(nodes) or '-'}), "
                             f"mirrored resourceVersion {k.get('resource_version') or '-'}")
    for name, f in rep.features.items():
        _line(name, f.get("state", "?"), f.get("reason") or f.get("detail") or "")
    pol = rep.policies
    if pol:
        unenforced = pol.get("not_enforced") or {}
        failed = sum(len(v) for v in (pol.get("failed_endpoints") or {}).values())
        _line("Policies", f"{pol.get('in_force', 0)} in force",
              f"{len(unenforced)} accepted with fields not enforced, {pol.get('refused', 0)} refused, "
              f"{failed} endpoint policies failed")
        for key, items in unenforced.items():
            for item in items:
                print(f"{'':<22}accepted, not enforced: {key} {item}")
        for node, eps in (pol.get("failed_endpoints") or {}).items():
            for ep, why in eps.items():
                print(f"{'':<22}failed on {node}: {ep}: {why}")
    missing = [v["detail"] for v in rep.kernel.values() if not v["available"]]
    if missing:
        _line("Kernel lacks", "; ".join(missing))
    print()
    print_table(["SERVICE", "NODE", "VERSION", "UPTIME", "HEALTH"],
                [[s["service"], s["node"] or "-", s.get("version", "-"),
                  duration(s["uptime_s"]) if "uptime_s" in s else "-",
                  s["health"] + (f" ({'; '.join(s['reasons'])})" if s["reasons"] else "")]
                 for s in rep.services])
    if rep.problems:
        print()
        print("Problems:")
        for p in rep.problems:
            print(f"  - {p}")
