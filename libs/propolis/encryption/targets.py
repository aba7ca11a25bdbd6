"""Reconciler targets of the key manager (`propolis.reconcile.Reconciler` runs them).

`PeerTarget`: WireGuard peers of `cilium_wg0`, keyed by public key (base64).
`RouteTarget`: routes of remote pod CIDRs through `cilium_wg0` in the node's
namespace (main table), so cross-node pod traffic enters the tunnel; same-node
traffic never matches them (local pods have /32 routes on their lxc).
Both are idempotent: update = replace, delete of a missing object = success.
Shown by `propolis encrypt status`.
"""

from __future__ import annotations

import asyncio
import errno
from dataclasses import replace
from typing import Any, Iterable

from pyroute2.netlink.exceptions import NetlinkError

from propolis.encryption.backend import DEVICE, WireguardBackend
from propolis.encryption.uapi import PeerConfig
from propolis.errors import TemporaryError


#: Keepalive (s) set for a moment on a new peer: WireGuard sends a keepalive at once when keepalive is turned
#: on, which starts the handshake now instead of with the first packet. After a key rotation the node that
#: learned the new key is the one that can complete a handshake, so it must be the one to start it.
HANDSHAKE_KICK_KEEPALIVE_S = 25


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
        from propolis.sandbox.netns import iproute_in
        return iproute_in(netns)
    from pyroute2 import IPRoute
    return IPRoute()


class RouteTarget:
    """``<pod CIDR> dev cilium_wg0`` routes in the node's namespace."""

    def __init__(self, netns: str | None, device: str = DEVICE) -> None:
        self.netns = netns
        self.device = device

    def _ifindex(self, ipr: Any) -> int:
        found = ipr.link_lookup(ifname=self.device)
        if not found:
            raise TemporaryError(f"route via {self.device}: device does not exist (yet)")
        return int(found[0])

    async def update(self, key: str, desired: str) -> None:
        def work() -> None:
            with _iproute(self.netns) as ipr:
                ipr.route("replace", dst=key, oif=self._ifindex(ipr))
        await asyncio.to_thread(work)

    async def delete(self, key: str) -> None:
        def work() -> None:
            with _iproute(self.netns) as ipr:
                found = ipr.link_lookup(ifname=self.device)
                if not found:
                    return  # device gone: so are its routes
                try:
                    ipr.route("del", dst=key, oif=found[0])
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
                for r in ipr.get_routes(family=2, table=254):
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
