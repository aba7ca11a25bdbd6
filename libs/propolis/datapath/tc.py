"""tc clsact attach/detach of the two bpf_lxc programs on a pod's host-side veth, inside the
node's network namespace, with pyroute2's asyncio API.

Why netns sockets: the datapath-writer runs in the root namespace (like a hostNetwork pod)
and acts on its node through netlink sockets opened inside the node's namespace. Sockets
are cached per namespace (opening one forks a helper in pyroute2) and never create a
namespace that is missing. Writes are idempotent: clsact "add" accepts EEXIST, filters
are "replace"d atomically (same prio/handle, so a reload swaps programs without a gap),
and detach accepts ENOENT/ENODEV/EINVAL (already gone). Inspect: `tc filter show dev lxc… ingress`
inside the node namespace.
"""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass
from typing import Any

import pyroute2.config
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from propolis.errors import PermanentError, TemporaryError

PARENT_INGRESS = 0xFFFFFFF2  # clsact ingress: packets from the pod (cil_from_container)
PARENT_EGRESS = 0xFFFFFFF3   # clsact egress: packets to the pod (cil_to_container)
FILTER_PRIO = 1
FILTER_HANDLE = 1
_GONE = {errno.ENOENT, errno.ENODEV, errno.EINVAL}

# A netns socket is made by a forked helper that pyroute2 ends with SIGTERM. The fork inherits
# asyncio's signal handler and wakeup fd, so a SIGTERM reaching the helper before it exits was
# written to *our* event loop as if we had been told to stop: the datapath-writer shut down
# (exit 0) right after its first attach in about one start out of three. With this setting the
# helper resets SIGTERM to its default before it answers, so the parent's SIGTERM just ends it.
pyroute2.config.disable_mp_signal = True


class InterfaceGone(TemporaryError):
    """The interface to attach to does not exist (any more) in its namespace."""


@dataclass(frozen=True)
class AttachedFilter:
    parent: str  # "ingress" / "egress"
    name: str    # program name tc shows
    prog_id: int | None


class TcAttacher:
    """Attach/detach bpf_lxc programs on interfaces of one or more namespaces."""

    def __init__(self) -> None:
        self._sockets: dict[str | None, AsyncIPRoute] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _ipr(self, netns: str | None) -> AsyncIPRoute:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._drop_sockets()
            self._loop = loop
        ipr = self._sockets.get(netns)
        if ipr is None:
            ipr = AsyncIPRoute(netns=netns, flags=0) if netns else AsyncIPRoute()
            self._sockets[netns] = ipr
        return ipr

    def _drop_sockets(self) -> None:
        for ipr in self._sockets.values():
            try:
                ipr.close()
            except Exception:  # noqa: BLE001 - closing on the way out: a failure changes nothing
                pass
        self._sockets.clear()

    async def close(self) -> None:
        self._drop_sockets()

    async def ifindex_of(self, netns: str | None, ifname: str) -> int:
        ipr = await self._ipr(netns)
        found = await ipr.link_lookup(ifname=ifname)
        if not found:
            raise PermanentError(f"no interface {ifname} in netns {netns or 'root'}")
        return int(found[0])

    async def attach(self, netns: str | None, ifindex: int, *, from_container: tuple[int, str],
                     to_container: tuple[int, str]) -> None:
        """Put cil_from_container on ingress and cil_to_container on egress of ifindex.

        `from_container`/`to_container` are (program fd, program name).
        """
        ipr = await self._ipr(netns)
        try:
            await ipr.tc("add", "clsact", ifindex)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                raise InterfaceGone(f"add clsact on ifindex {ifindex} in {netns}: {exc}") from exc
            if exc.code != errno.EEXIST:
                raise TemporaryError(f"add clsact on ifindex {ifindex} in {netns}: {exc}") from exc
        for parent, (fd, name) in ((PARENT_INGRESS, from_container), (PARENT_EGRESS, to_container)):
            try:
                await ipr.tc("replace-filter", "bpf", ifindex, FILTER_HANDLE, fd=fd, name=name,
                             parent=parent, prio=FILTER_PRIO, classid=1, direct_action=True)
            except NetlinkError as exc:
                error = InterfaceGone if exc.code == errno.ENODEV else TemporaryError
                raise error(f"attach {name} on ifindex {ifindex} in {netns}: {exc}") from exc

    async def attach_ingress(self, netns: str | None, ifindex: int, program: tuple[int, str]) -> None:
        """Put one program on tc ingress only (cil_from_netdev on the node's underlay device)."""
        await self._attach_one(netns, ifindex, program, PARENT_INGRESS)

    async def attach_egress(self, netns: str | None, ifindex: int, program: tuple[int, str]) -> None:
        """Put one program on tc egress only (cil_to_netdev on the node's underlay device)."""
        await self._attach_one(netns, ifindex, program, PARENT_EGRESS)

    async def _attach_one(self, netns: str | None, ifindex: int, program: tuple[int, str], parent: int) -> None:
        ipr = await self._ipr(netns)
        try:
            await ipr.tc("add", "clsact", ifindex)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise TemporaryError(f"add clsact on ifindex {ifindex} in {netns}: {exc}") from exc
        fd, name = program
        try:
            await ipr.tc("replace-filter", "bpf", ifindex, FILTER_HANDLE, fd=fd, name=name,
                         parent=parent, prio=FILTER_PRIO, classid=1, direct_action=True)
        except NetlinkError as exc:
            raise TemporaryError(f"attach {name} on ifindex {ifindex} in {netns}: {exc}") from exc

    async def detach(self, netns: str | None, ifindex: int) -> bool:
        """Remove the clsact qdisc (and with it both filters); False if it was not there."""
        ipr = await self._ipr(netns)
        try:
            await ipr.tc("del", "clsact", ifindex)
        except (FileNotFoundError, TimeoutError):
            self._sockets.pop(netns, None)
            return False  # namespace gone: nothing attached any more
        except NetlinkError as exc:
            if exc.code in _GONE:
                return False
            raise TemporaryError(f"detach from ifindex {ifindex} in {netns}: {exc}") from exc
        return True

    async def filters(self, netns: str | None, ifindex: int) -> list[AttachedFilter]:
        """The bpf filters on an interface (for checks and `status`)."""
        ipr = await self._ipr(netns)
        out: list[AttachedFilter] = []
        for parent, label in ((PARENT_INGRESS, "ingress"), (PARENT_EGRESS, "egress")):
            try:
                msgs: Any = await ipr.get_filters(ifindex, parent=parent)
            except NetlinkError as exc:
                if exc.code in _GONE:
                    continue
                raise
            async for msg in msgs:
                if msg.get_attr("TCA_KIND") != "bpf":
                    continue
                options = msg.get_attr("TCA_OPTIONS")
                if not options:
                    continue
                name = options.get_attr("TCA_BPF_NAME")
                prog_id = options.get_attr("TCA_BPF_ID")
                out.append(AttachedFilter(label, name, prog_id))
        return out
