"""Where and how a pod's bandwidth is shaped, and the qdiscs that do it (pyroute2, idempotent).

Cilium shapes pod egress with EDT: BPF stamps each packet's departure time and the `fq` qdisc on the
node's device holds it until then. Without sch_fq (this kernel) there is no EDT, so each direction
gets a token bucket (`tbf`) on the one interface all of that pod's traffic in that direction crosses:

* egress (pod -> anywhere): root qdisc of the pod's own `eth0`, in the pod's namespace. This is the
  exact place: the qdisc sits right under the sending sockets, so TCP sees back-pressure (TSQ) and
  paces itself instead of losing packets, and every destination (same node, other node, world) is
  covered. The alternative, an ifb behind the lxc's ingress, shapes after the veth and can only
  drop. The node agent owns the pod's interface set-up (CNI), so it may configure it.
* ingress (anywhere -> pod): root qdisc of the host-side `lxc…` veth in the node's namespace, which
  every packet to the pod leaves through (after `cil_to_container` on its clsact egress).

One tbf per interface (the interface belongs to one pod, so no classes or filters are needed):
`rate` = the annotation, a burst of at least one 64 KiB GSO packet (tbf refuses larger packets
otherwise), a queue of `QUEUE_LATENCY` at that rate (TCP keeps the link busy; drops tell it to slow
down). Our qdisc is recognised by its handle `SHAPER_HANDLE`; the one shaped rate is read back.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from propolis.errors import PermanentError, TemporaryError
from propolis.kernel_probe import KernelFeature
from propolis.runtime.netns import entered

#: 0x5050: our root qdisc (the handle `tc qdisc show` prints as 5050:)
SHAPER_HANDLE = 0x5050 << 16
#: at least one GSO super-packet (64 KiB) plus headers, else tbf drops it; 10 ms of the rate above that
MIN_BURST_BYTES = 128 * 1024
BURST_SECONDS = 0.010
#: how long a packet may wait in the queue: more than any in-sandbox RTT, little enough to stay responsive
QUEUE_LATENCY = "25ms"
#: tbf's rate field is 32-bit bytes per second (pyroute2 does not send TCA_TBF_RATE64)
MAX_TBF_BITS_PER_SECOND = (2**32 - 1) * 8
_GONE = {errno.ENOENT, errno.ENODEV, errno.EINVAL}


@dataclass(frozen=True)
class BandwidthMode:
    """The shaper in use and why (`propolis status` prints both)."""

    name: str
    detail: str


def select_mode(kernel: Iterable[KernelFeature]) -> BandwidthMode:
    """EDT with fq where the kernel has sch_fq, else tbf; the EDT hook in bpf_lxc.c is not built yet, so
    a kernel with sch_fq gets tbf too, and says so."""
    fq = next((f for f in kernel if f.name == "sch_fq"), None)
    where = "per pod: egress on its eth0, ingress on its lxc veth"
    if fq is None or not fq.available:
        why = fq.detail if fq is not None else "sch_fq not probed"
        return BandwidthMode("tbf", f"tbf {where} (no EDT: {why})")
    return BandwidthMode("tbf", f"tbf {where} (sch_fq available, EDT with fq not built yet)")


def burst_bytes(bits_per_second: int) -> int:
    return max(MIN_BURST_BYTES, int(bits_per_second / 8 * BURST_SECONDS))


def _ipr(netns: str | None) -> IPRoute:
    """An rtnetlink socket in `netns`, made by this worker thread entering it (no helper process forked per
    call, as pyroute2's netns sockets do). FileNotFoundError when the namespace is gone."""
    if not netns:
        return IPRoute()
    try:
        with entered(netns):
            return IPRoute()
    except TemporaryError as exc:  # `entered`'s "does not exist"
        raise FileNotFoundError(str(exc)) from exc


def _ifindex(ipr: IPRoute, ifname: str) -> int | None:
    links = ipr.link_lookup(ifname=ifname)
    return links[0] if links else None


def _root_rate(qdiscs: list[Any], ifindex: int) -> int | None:
    """The rate (bits/s) of our root tbf on `ifindex`, None if it has none."""
    for q in qdiscs:
        if q["index"] == ifindex and q["handle"] == SHAPER_HANDLE and q.get_attr("TCA_KIND") == "tbf":
            options = q.get_attr("TCA_OPTIONS")  # a netlink message (pyroute2 ships no types)
            parms = options.get_attr("TCA_TBF_PARMS") if options is not None else None
            return int(parms["rate"]) * 8 if parms else 0
    return None


async def read_rate(netns: str | None, ifname: str) -> int | None:
    """The rate our root tbf on `ifname` shapes to (bits/s); None without one or without the interface."""
    return await asyncio.to_thread(_read_rate, netns, ifname)


def _read_rate(netns: str | None, ifname: str) -> int | None:
    try:
        with _ipr(netns) as ipr:
            index = _ifindex(ipr, ifname)
            return None if index is None else _root_rate(list(ipr.get_qdiscs(index)), index)
    except FileNotFoundError:
        return None  # the pod's namespace is gone: nothing shapes it any more
    except (OSError, NetlinkError) as exc:
        if getattr(exc, "code", None) in _GONE:
            return None
        raise TemporaryError(f"read qdisc of {ifname} in {netns or 'root'}: {exc}") from exc


async def set_rate(netns: str | None, ifname: str, bits_per_second: int) -> None:
    """Shape `ifname`'s transmit direction to `bits_per_second` (0 = remove our shaper). Idempotent: an
    unchanged rate is not rewritten (replacing a tbf refills its bucket: a burst each time)."""
    await asyncio.to_thread(_set_rate, netns, ifname, bits_per_second)


def _set_rate(netns: str | None, ifname: str, bits_per_second: int) -> None:
    where = f"{ifname} in {netns or 'root'}"
    if bits_per_second > MAX_TBF_BITS_PER_SECOND:
        raise PermanentError(f"shape {where}: {bits_per_second} bits/s is above what tbf can hold "
                             f"({MAX_TBF_BITS_PER_SECOND})")
    try:
        with _ipr(netns) as ipr:
            index = _ifindex(ipr, ifname)
            if index is None:
                if bits_per_second:
                    raise TemporaryError(f"shape {where}: no such interface")
                return  # gone with its pod: nothing to unshape
            current = _root_rate(list(ipr.get_qdiscs(index)), index)
            if current == ((bits_per_second // 8 * 8) or None):  # the kernel keeps whole bytes per second
                return
            if not bits_per_second:
                ipr.tc("del", index=index, handle=SHAPER_HANDLE, parent=0xFFFFFFFF)
                return
            ipr.tc("replace", "tbf", index=index, handle=SHAPER_HANDLE, rate=f"{bits_per_second}bit",
                   burst=burst_bytes(bits_per_second), latency=QUEUE_LATENCY)
    except FileNotFoundError as exc:
        if bits_per_second:
            raise TemporaryError(f"shape {where}: namespace gone: {exc}") from exc
    except NetlinkError as exc:
        if not bits_per_second and exc.code in _GONE:
            return  # already unshaped
        raise TemporaryError(f"shape {where} to {bits_per_second} bits/s: {exc}") from exc


async def shaped_interfaces(netns: str | None) -> list[str]:
    """Interfaces of `netns` that carry our root tbf (what the writer's pruning reads)."""
    return await asyncio.to_thread(_shaped_interfaces, netns)


def _shaped_interfaces(netns: str | None) -> list[str]:
    try:
        with _ipr(netns) as ipr:
            shaped = {q["index"] for q in ipr.get_qdiscs() if q["handle"] == SHAPER_HANDLE}
            return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links() if link["index"] in shaped]
    except (OSError, NetlinkError) as exc:
        raise TemporaryError(f"list qdiscs in {netns or 'root'}: {exc}") from exc
