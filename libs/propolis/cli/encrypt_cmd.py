"""`propolis encrypt status|rotate-key`: transparent encryption as `cilium encrypt status` shows it.

Both read what each node's wireguard-keymgr reports in its heartbeat (KV
`PROPOLIS_HEARTBEATS_V1`, progress ``wireguard``: key, peers with endpoint,
allowed IPs, last handshake and bytes, refused nodes). ``rotate-key`` asks a
node's key manager over NATS (`subjects.encryption_rotate_subject`) to replace
its key pair; the other nodes replace the peer when they see the new public key.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from propolis.bus import subjects
from propolis.bus.messages import Event, WireguardNodeKey
from propolis.cli.common import add_output_flag, add_sandbox_flag, connect_bus, print_json, print_table
from propolis.errors import CliError
from propolis.runtime.heartbeats import is_live, read_heartbeats

KEYMGR = "wireguard-keymgr"
WRITER = "datapath-writer"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    enc = sub.add_parser("encrypt", help="transparent encryption (WireGuard): status and key rotation")
    verbs = enc.add_subparsers(dest="encrypt_command", metavar="VERB")
    st = verbs.add_parser("status", help="mode, keys and peers of every node (like `cilium encrypt status`)")
    add_sandbox_flag(st)
    add_output_flag(st)
    st.set_defaults(func=status_cmd)
    rot = verbs.add_parser("rotate-key", help="replace a node's WireGuard key pair (default: every node, in turn)")
    add_sandbox_flag(rot)
    rot.add_argument("--node", default=None, help="only this node")
    rot.add_argument("--wait", type=float, default=10.0, metavar="S",
                     help="wait up to S seconds until every other node has the new key as peer (0 = do not wait)")
    rot.set_defaults(func=rotate_cmd)

    def usage(_args: argparse.Namespace) -> int:
        enc.print_help()
        return 0
    enc.set_defaults(func=usage)


async def node_states(bus: Any) -> dict[str, dict[str, Any]]:
    """node -> the live key manager's ``progress["wireguard"]`` (newest instance per node), with the node's
    strict mode under ``strict_mode`` (the datapath-writer's: it is enforced in BPF; None = off)."""
    now = time.time()
    beats = sorted((hb for hb in await read_heartbeats(bus) if is_live(hb, now)), key=lambda hb: hb.sent_at)
    strict = {hb.node: hb.progress.get("encryption_strict_mode") for hb in beats if hb.service == WRITER}
    return {hb.node: {**hb.progress.get("wireguard", {}), "strict_mode": strict.get(hb.node)}
            for hb in beats if hb.service == KEYMGR}


def _ago(ts: float) -> str:
    return "never" if not ts else f"{time.time() - ts:.0f}s ago"


async def status_cmd(args: argparse.Namespace) -> int:
    bus = await connect_bus(args, "propolis-encrypt")
    try:
        states = await node_states(bus)
    finally:
        await bus.close()
    if args.output == "json":
        print_json({"mode": "Wireguard" if states else "Disabled", "nodes": states})
        return 0
    if not states:
        print("Encryption: Disabled (no wireguard-keymgr running: `propolis sandbox up --encryption wireguard`)")
        return 0
    for node, st in sorted(states.items()):
        print(f"Node {node}")
        print("  Encryption: Wireguard")
        print(f"  Node encryption: {'Enabled' if st.get('node_encryption') else 'Disabled'}")
        strict = st.get("strict_mode")
        print("  Strict mode: " + (f"Enabled (CIDR {strict['cidr']}, allowRemoteNodeIdentities: "
                                   f"{str(strict['allow_remote_node_identities']).lower()})" if strict else "Disabled"))
        print(f"  Interface: cilium_wg0 ({st.get('backend', '?')}{', pid ' + str(st['pid']) if st.get('pid') else ''})")
        print(f"    Public key: {st.get('public_key', '?')}")
        print(f"    Port: {st.get('listen_port', '?')}")
        print(f"    Number of peers: {st.get('peers', 0)}")
        for refused_node, why in sorted((st.get("refused") or {}).items()):
            print(f"    Refused peer {refused_node}: {why}")
        peers = st.get("peer_list") or []
        if peers:
            print_table(["    PEER", "PUBLIC KEY", "ENDPOINT", "ALLOWED IPS", "LAST HANDSHAKE", "RX", "TX"],
                        [["    " + p["node"], p["public_key"], p["endpoint"], ",".join(p["allowed_ips"]),
                          _ago(p["last_handshake"]), p["rx_bytes"], p["tx_bytes"]] for p in peers])
    return 0


async def rotate_cmd(args: argparse.Namespace) -> int:
    bus = await connect_bus(args, "propolis-encrypt")
    try:
        states = await node_states(bus)
        if not states:
            raise CliError("no wireguard-keymgr is running: nothing to rotate")
        nodes = [args.node] if args.node else sorted(states)
        unknown = [n for n in nodes if n not in states]
        if unknown:
            raise CliError(f"no wireguard-keymgr on node {', '.join(unknown)}; running on {', '.join(sorted(states))}")
        for node in nodes:
            t0 = time.monotonic()
            try:
                reply = await bus.request(subjects.encryption_rotate_subject(node),
                                          Event("RotateKey", f"Node {node}", "propolis encrypt rotate-key", "cli",
                                                node, time.time()), timeout=5.0)
            except Exception as exc:  # timeouts and no-responders alike
                raise CliError(f"rotate-key on {node}: no answer from its wireguard-keymgr ({exc})") from exc
            if not isinstance(reply, WireguardNodeKey):
                raise CliError(f"rotate-key on {node}: unexpected answer {reply!r}")
            old = states[node].get("public_key", "?")
            print(f"{node}: {old} -> {reply.public_key}")
            if args.wait > 0:
                others = [n for n in states if n != node]
                deadline = time.monotonic() + args.wait
                while True:
                    now_states = await node_states(bus)
                    pending = [n for n in others
                               if reply.public_key not in {p["public_key"] for p in
                                                           now_states.get(n, {}).get("peer_list") or []
                                                           if p.get("configured")}]
                    if not pending:
                        print(f"  peers updated on {len(others)} node(s) within {time.monotonic() - t0:.1f}s "
                              "(heartbeat resolution)")
                        break
                    if time.monotonic() > deadline:
                        raise CliError(f"rotate-key on {node}: {', '.join(pending)} still lack the new key "
                                       f"after {args.wait:.0f}s")
                    await asyncio.sleep(0.3)
    finally:
        await bus.close()
    return 0
