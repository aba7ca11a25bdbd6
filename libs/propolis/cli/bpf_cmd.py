"""`propolis bpf …`: the node's BPF maps as they are in the kernel, like `cilium bpf …`.

Reads the pinned maps of `--node NAME` (under /sys/fs/bpf/propolis/NAME) or `--pin-dir`
directly with bpf(2) — no compile, no agent needed, works while the writer is down.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from propolis.cli.common import add_output_flag, print_json, print_table
from propolis.errors import CliError
from propolis.maps import bpf, conntrack, endpoints, ipcache, metrics, policy
from propolis.maps.spec import MapSpec, default_pin_dir


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = sub.add_parser("bpf", help="show the node's BPF maps (like `cilium bpf`)")
    nouns = group.add_subparsers(dest="bpf_command", metavar="MAP")
    verbs_of: dict[str, Any] = {}

    def add(noun: str, verb: str, help_text: str, func: Callable[[argparse.Namespace], Any]) -> argparse.ArgumentParser:
        if noun not in verbs_of:
            verbs_of[noun] = nouns.add_parser(noun, help=help_text).add_subparsers(dest=f"{noun}_verb", metavar="VERB")
        parser: argparse.ArgumentParser = verbs_of[noun].add_parser(verb, help=help_text)
        parser.add_argument("--node", help="node name (pins under /sys/fs/bpf/propolis/NODE)")
        parser.add_argument("--pin-dir", help="pin directory of the node's maps")
        add_output_flag(parser)
        parser.set_defaults(func=func)
        return parser

    add("endpoint", "list", "local endpoints (cilium_lxc)", endpoint_list)
    add("ipcache", "list", "IP/CIDR -> identity (cilium_ipcache)", ipcache_list)
    get = add("policy", "get", "an endpoint's policy map (cilium_policy_v2_<EPID>)", policy_get)
    get.add_argument("endpoint_id", type=int, metavar="ENDPOINT_ID")
    add("ct", "list", "connection tracking entries (cilium_ct4_global, cilium_ct_any4_global)", ct_list)
    add("ct", "flush", "delete every connection tracking entry (open flows meet policy again)", ct_flush)
    add("metrics", "list", "packets/bytes per reason and direction (cilium_metrics)", metrics_list)
    add("lb", "list", "service LB entries (cilium_lb4_services_v2, cilium_lb4_backends_v3)",
        lambda a: __import__("propolis.cli.service_cmd", fromlist=["bpf_lb_list"]).bpf_lb_list(a))
    remove = add("pins", "remove", "detach a node's programs and remove all its pins", pins_remove)
    remove.add_argument("--netns", help="the node's network namespace (to detach the tc programs)")


def _pin_dir(args: argparse.Namespace) -> str:
    if args.pin_dir:
        return str(args.pin_dir)
    if args.node:
        return default_pin_dir(args.node)
    raise CliError("give --node NAME or --pin-dir DIR")


def _open(spec: MapSpec, pin_dir: str) -> bpf.BpfMap[Any, Any]:
    try:
        return spec.open(pin_dir)
    except FileNotFoundError:
        raise CliError(f"no {spec.pin_name} pinned under {pin_dir} (is the node's datapath loaded?)") from None
    except bpf.BpfError as exc:
        raise CliError(str(exc)) from None


def endpoint_list(args: argparse.Namespace) -> int:
    with _open(endpoints.SPEC, _pin_dir(args)) as bpf_map:
        rows = endpoints.dump(bpf_map)
    if args.output == "json":
        print_json([r.to_json() for r in rows])
        return 0
    print_table(["IP ADDRESS", "LOCAL ENDPOINT INFO"], [
        [r.ip, f"id={r.endpoint_id:<5} sec_id={r.identity:<7} flags=0x{r.flags:04x} ifindex={r.ifindex:<4} "
               f"enforced={_enforced(r)}"] for r in rows])
    return 0


def _enforced(entry: endpoints.EndpointEntry) -> str:
    directions = [name for name, on in (("ingress", entry.ingress_enforced), ("egress", entry.egress_enforced)) if on]
    return ",".join(directions) or "none"


def ipcache_list(args: argparse.Namespace) -> int:
    with _open(ipcache.SPEC, _pin_dir(args)) as bpf_map:
        rows = ipcache.dump(bpf_map)
    if args.output == "json":
        print_json([r.to_json() for r in rows])
        return 0
    print_table(["IP PREFIX/ADDRESS", "IDENTITY"],
                [[r.cidr, f"identity={r.identity} encryptkey=0 tunnelendpoint={r.tunnel_endpoint or '0.0.0.0'}"]
                 for r in rows])
    return 0


def policy_get(args: argparse.Namespace) -> int:
    pin_dir = _pin_dir(args)
    path = os.path.join(pin_dir, policy.inner_pin_name(args.endpoint_id))
    try:
        bpf_map: bpf.BpfMap[Any, Any] = bpf.BpfMap.open_pinned(path, policy.PolicyKey, policy.PolicyValue)
    except FileNotFoundError:
        raise CliError(f"endpoint {args.endpoint_id} has no policy map ({path})") from None
    with bpf_map:
        rows = policy.read_rows(bpf_map)
    described = [policy.describe_row(k, v, packets, nbytes) for k, (v, packets, nbytes) in sorted(rows.items())]
    if args.output == "json":
        print_json(described)
        return 0
    print_table(["POLICY", "DIRECTION", "IDENTITY", "PORT/PROTO", "PROXY PORT", "BYTES", "PACKETS", "PREFIX"],
                [[d["policy"], d["direction"], d["identity"] or "ANY", d["port_protocol"], d["proxy_port"],
                  d["bytes"], d["packets"], d["prefix"]] for d in described])
    return 0


def ct_list(args: argparse.Namespace) -> int:
    pin_dir = _pin_dir(args)
    rows: list[conntrack.CtRow] = []
    for spec in (conntrack.TCP_SPEC, conntrack.ANY_SPEC):
        with _open(spec, pin_dir) as bpf_map:
            rows.extend(conntrack.dump(bpf_map))
    if args.output == "json":
        print_json([r.to_json() for r in rows])
        return 0
    for r in rows:
        j = r.to_json()
        print(f"{j['protocol']} {j['direction']} {j['source']} -> {j['destination']} expires={r.expires_in} "
              f"RxPackets={r.rx_packets} RxBytes={r.rx_bytes} TxPackets={r.tx_packets} TxBytes={r.tx_bytes} "
              f"Flags=0x{r.flags:04x} SourceSecurityID={r.src_identity} DestSecurityID={r.dst_identity} "
              f"Endpoint={r.endpoint_id}")
    return 0


def ct_flush(args: argparse.Namespace) -> int:
    """Like `cilium bpf ct flush global`: both tables emptied, what went counted per map."""
    pin_dir = _pin_dir(args)
    flushed = {}
    for spec in (conntrack.TCP_SPEC, conntrack.ANY_SPEC):
        with _open(spec, pin_dir) as bpf_map:
            flushed[spec.pin_name] = conntrack.flush(bpf_map)
    if args.output == "json":
        print_json({"flushed": flushed})
        return 0
    for name, count in flushed.items():
        print(f"Flushed {count} entries from {name}")
    return 0


def metrics_list(args: argparse.Namespace) -> int:
    with _open(metrics.SPEC, _pin_dir(args)) as bpf_map:
        rows = metrics.dump(bpf_map)
    if args.output == "json":
        print_json([r.to_json() for r in rows])
        return 0
    print_table(["REASON", "DIRECTION", "PACKETS", "BYTES"],
                [[r.reason_name, metrics.DIRECTION_NAMES.get(r.direction, r.direction), r.packets, r.bytes]
                 for r in rows])
    return 0


async def pins_remove(args: argparse.Namespace) -> int:
    from propolis.datapath import Datapath

    pin_dir = _pin_dir(args)
    node = args.node or os.path.basename(pin_dir.rstrip("/"))
    await Datapath(node, pin_dir, netns=args.netns).remove_all()
    if args.output == "json":
        print_json({"removed": pin_dir})
    else:
        print(f"removed {pin_dir}")
    return 0
