"""`propolis clustermesh enable|connect|disconnect|status`, like `cilium clustermesh`.

In the sandbox a cluster is a sandbox started with `--cluster-id`; `connect` joins two sandboxes both
ways (`clustermesh/sandbox.py`), `status` reads what the local clustermesh-apiserver reports in its
heartbeat (progress ``clustermesh``: each remote's connection and sync state).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from propolis.cli.common import add_output_flag, add_sandbox_flag, connect_bus, print_json
from propolis.clustermesh import SERVICE
from propolis.errors import CliError, PermanentError
from propolis.runtime.heartbeats import is_live, read_heartbeats
from propolis_sandbox.config import DEFAULT_NAME, load_state


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cm = sub.add_parser("clustermesh", help="Cluster Mesh: connect clusters, global services, cross-cluster policy")
    verbs = cm.add_subparsers(dest="clustermesh_command", metavar="VERB")
    en = verbs.add_parser("enable", help="check that this cluster exports (its clustermesh-apiserver runs)")
    add_sandbox_flag(en)
    en.set_defaults(func=enable_cmd)
    for verb, fn, what in (("connect", connect_cmd, "connect to another cluster, both directions"),
                           ("disconnect", disconnect_cmd, "withdraw a connected cluster, both directions")):
        p = verbs.add_parser(verb, help=what)
        add_sandbox_flag(p)
        p.add_argument("--destination", required=True, metavar="NAME", help="the other cluster (sandbox name)")
        p.set_defaults(func=fn)
    st = verbs.add_parser("status", help="remote clusters and their sync state")
    add_sandbox_flag(st)
    add_output_flag(st)
    st.add_argument("--wait", action="store_true", help="wait until every remote cluster is ready")
    st.add_argument("--wait-duration", type=float, default=60.0, metavar="S", help="how long --wait waits")
    st.set_defaults(func=status_cmd)

    def show_help(args: argparse.Namespace) -> int:
        cm.print_help()
        return 0
    cm.set_defaults(func=show_help)


def _state(name: str | None) -> Any:
    name = name or DEFAULT_NAME
    state = load_state(name)
    if state is None:
        raise CliError(f"cluster {name!r} is not up: `propolis sandbox up --name {name} --cluster-id N`")
    return state


def enable_cmd(args: argparse.Namespace) -> int:
    cfg = _state(args.sandbox).sandbox()
    if not cfg.cluster_id:
        raise CliError(f"cluster {cfg.name!r} has no cluster id: Cluster Mesh needs one from the start "
                       f"(`propolis sandbox down --name {cfg.name}`, then `sandbox up --name {cfg.name} --cluster-id N`)")
    print(f"✅ Cluster Mesh enabled: cluster {cfg.name} (id {cfg.cluster_id}) exports through its {SERVICE}")
    return 0


def connect_cmd(args: argparse.Namespace) -> int:
    from propolis_sandbox import clustermesh as sandbox
    local, remote = _state(args.sandbox), _state(args.destination)
    try:
        sandbox.connect(local, remote)
    except PermanentError as exc:
        raise CliError(str(exc)) from exc
    print(f"✅ Connected cluster {local.sandbox().name} <=> {remote.sandbox().name}")
    return 0


def disconnect_cmd(args: argparse.Namespace) -> int:
    from propolis_sandbox import clustermesh as sandbox
    local = _state(args.sandbox)
    sandbox.disconnect(local, load_state(args.destination), args.destination)
    print(f"✅ Disconnected cluster {local.sandbox().name} <=> {args.destination}")
    return 0


async def mesh_report(bus: Any) -> dict[str, Any] | None:
    """The live clustermesh-apiserver's progress ``clustermesh`` (None: none runs)."""
    now = time.time()
    beats = sorted((hb for hb in await read_heartbeats(bus) if hb.service == SERVICE and is_live(hb, now)),
                   key=lambda hb: hb.sent_at)
    return dict(beats[-1].progress.get("clustermesh", {})) if beats else None


def render(report: dict[str, Any] | None) -> str:
    if report is None:
        return f"Cluster Mesh: disabled ({SERVICE} not running)"
    lines = [f"Cluster: {report.get('cluster_name')} (id {report.get('cluster_id')})",
             f"Cluster Mesh: {report.get('ready', 0)}/{report.get('total', 0)} remote clusters ready"]
    for r in report.get("remotes", []):
        mark = "✅" if r.get("ready") else "❌"
        state = "synced" if r.get("synced") else "not synced"
        conn = "connected" if r.get("connected") else "not connected"
        lines.append(f"  {mark} {r['name']} (id {r['id']}): {conn}, {state}, {r.get('entries', 0)} entries"
                     + (f" — {r['error']}" if r.get("error") else ""))
    return "\n".join(lines)


def all_ready(report: dict[str, Any] | None) -> bool:
    return report is not None and report.get("ready", 0) == report.get("total", 0)


async def status_cmd(args: argparse.Namespace) -> int:
    bus = await connect_bus(args, "propolis-clustermesh")
    try:
        deadline = time.monotonic() + args.wait_duration
        report = await mesh_report(bus)
        while args.wait and not all_ready(report) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            report = await mesh_report(bus)
    finally:
        await bus.close()
    if args.output == "json":
        print_json(report or {})
    else:
        print(render(report))
    return 0 if all_ready(report) else 1
