"""Reconciler targets of the key manager (`propolis.reconcile.Reconciler` runs them).

`PeerTarget`: WireGuard peers of `cilium_wg0`, keyed by public key (base64).
`RouteTarget`: routes of remote pod CIDRs through `cilium_wg0` in the node's
namespace (main table), so cross-node pod traffic enters the tunnel; same-node
traffic never matches them (local pods have /32 routes on their lxc).
With `encryption.nodeEncryption` a second `RouteTarget` fills `WIREGUARD_ROUTE_TABLE`
(other nodes' InternalIPs and pod CIDRs), which every packet not marked as the
device's own UDP meets first (`set_node_encryption_rule`): node-to-node and
node-to-pod traffic enter the tunnel too, WireGuard's own packets never do.
Both are idempotent: update = replace, delete of a missing object = success.
Shown by `propolis encrypt status`.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from propolis.encryption.backend import DEVICE, WireguardBackend
from propolis.encryption.uapi import PeerConfig
from propolis.errors import TemporaryError

#: Keepalive (s) set for a moment on a new peer: WireGuard sends a keepalive at once when keepalive is turned
#: on, which starts the handshake now instead of with the first packet. After a key rotation the node that
#: learned the new key is the one that can complete a handshake, so it must be the one to start it.
HANDSHAKE_KICK_KEEPALIVE_S = 25
FIB_RULE_INVERT = 0x2  # linux/fib_rules.h: the rule matches what does NOT carry the mark

MAIN_TABLE = 254
#: Cilium's linux_defaults.RouteTableWireguard: the routes node traffic takes into cilium_wg0 (nodeEncryption).
WIREGUARD_ROUTE_TABLE = 201
#: Cilium's MagicMarkWireGuardEncrypted: the device's own UDP packets carry it (fwmark) and skip that table.
WIREGUARD_ENCRYPTED_MARK, WIREGUARD_MARK_MASK = 0x1E00, 0xFF00
#: After the L7 proxy's rule (9: its marked packets are delivered locally first), before the sandbox's rule for
#: node-originated traffic (100) and the main table.
WIREGUARD_RULE_PRIORITY = 99


class PeerTarget:
    def __init__(self, backend: WireguardBackend) -> None:
        self.backend = backend

    async def update(self, key: str, desired: PeerConfig) -> None:
        if desired.persistent_keepalive == 0 and key not in (await self.backend.device()).peers:
            await self.backend.set_peer(replace(desired, persistent_keepalive=HANDSHAKE_KICK_KEEPALIVE_S))
        await self.backend.set_peer(desired)

    async def delete(self, key: str) -> None:
        await self.backend.remove_peer(key)  # removing an unknown peer is a no-op for WireGuard

    async def list_actual(self) -> Iterable[str]:
        return list((await self.backend.device()).peers)


def _iproute(netns: str | None) -> Any:
    if netns:
        from propolis.runtime.netns import iproute_in
        return iproute_in(netns)
    from pyroute2 import IPRoute
    return IPRoute()


class RouteTarget:
    """``<CIDR> dev cilium_wg0`` routes in the node's namespace, in one routing table."""

    def __init__(self, netns: str | None, device: str = DEVICE, table: int = MAIN_TABLE) -> None:
        self.netns = netns
        self.device = device
        self.table = table

    def _ifindex(self, ipr: Any) -> int:
        found = ipr.link_lookup(ifname=self.device)
        if not found:
            raise TemporaryError(f"route via {self.device}: device does not exist (yet)")
        return int(found[0])

    async def update(self, key: str, desired: str) -> None:
        def work() -> None:
            with _iproute(self.netns) as ipr:
                ipr.route("replace", dst=key, oif=self._ifindex(ipr), table=self.table)
        await asyncio.to_thread(work)

    async def delete(self, key: str) -> None:
        def work() -> None:
            with _iproute(self.netns) as ipr:
                found = ipr.link_lookup(ifname=self.device)
                if not found:
                    return  # device gone: so are its routes
                try:
                    ipr.route("del", dst=key, oif=found[0], table=self.table)
                except NetlinkError as exc:
                    if exc.code not in (errno.ESRCH, errno.ENOENT):
                        raise
        await asyncio.to_thread(work)

    async def list_actual(self) -> Iterable[str]:
        def work() -> list[str]:
            with _iproute(self.netns) as ipr:
                found = ipr.link_lookup(ifname=self.device)
                if not found:
                    return []
                out = []
                for r in ipr.get_routes(family=2, table=self.table):
                    if r.get_attr("RTA_OIF") == found[0] and r.get_attr("RTA_DST"):
                        out.append(f"{r.get_attr('RTA_DST')}/{r['dst_len']}")
                return out
        return await asyncio.to_thread(work)


def set_link_up(netns: str | None, device: str = DEVICE) -> None:
    with _iproute(netns) as ipr:
        found = ipr.link_lookup(ifname=device)
        if not found:
            raise TemporaryError(f"{device} does not exist in {netns or 'this namespace'}")
        ipr.link("set", index=found[0], state="up")


def set_node_encryption_rule(netns: str | None, enabled: bool) -> None:
    """``not fwmark 0x1E00/0xFF00 lookup 201`` present exactly when nodeEncryption is on (a key manager restarted
    without it takes its rule away)."""
    with _iproute(netns) as ipr:
        rule = dict(table=WIREGUARD_ROUTE_TABLE, priority=WIREGUARD_RULE_PRIORITY, fwmark=WIREGUARD_ENCRYPTED_MARK,
                    fwmask=WIREGUARD_MARK_MASK, flags=FIB_RULE_INVERT)
        present = any(r.get_attr("FRA_TABLE") == WIREGUARD_ROUTE_TABLE and r.get_attr("FRA_PRIORITY") ==
                      WIREGUARD_RULE_PRIORITY for r in ipr.get_rules(family=2))
        if enabled and not present:
            ipr.rule("add", **rule)
        elif present and not enabled:
            ipr.rule("del", **rule)
