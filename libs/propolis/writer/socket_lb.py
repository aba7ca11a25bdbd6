"""Socket LB (Cilium's socketLB, hostNamespaceOnly): the reconciler `socket-lb` of the datapath-writer.

Key = a bpf_sock.c program (`loader.SOCK_PROGRAMS`), value = where it is attached: the node's cgroup
and the network namespace it translates for. Desired = every program when `bpf-lb-sock` is on, none
when off, so turning it off (or a previous run's links) is pruned from the kernel. The actual state is
the node's pinned links, read from bpffs and the kernel's link info (`datapath/socket_lb.py`); a link
detached by hand, or left on a cgroup that was removed and made again, is re-created by the refresh.
The services themselves come from the LB maps the `lb` reconciler fills: nothing else to keep in step.
"""

from __future__ import annotations

from collections.abc import Iterable

from propolis.datapath.datapath import Datapath
from propolis.datapath.loader import SOCK_PROGRAMS
from propolis.datapath.socket_lb import SockAttachment, SocketLbAttacher
from propolis.errors import PermanentError

#: what `propolis status` says when it works (Cilium's "Socket LB" line, with its coverage)
ENABLED_STATE = "Enabled (hostNamespaceOnly)"


def desired_socket_lb(enabled: bool, cgroup: str, host_netns_cookie: int) -> dict[str, SockAttachment]:
    if not enabled:
        return {}
    attachment = SockAttachment(cgroup, host_netns_cookie)
    return {program: attachment for program in SOCK_PROGRAMS}


class SocketLbTarget:
    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self.attacher = SocketLbAttacher(dp.pin_dir)

    async def update(self, program: str, desired: SockAttachment) -> None:
        """The namespace's cookie first: a program attached before it would translate for a stale one."""
        if self.dp.programs is None:
            raise PermanentError(f"socket LB of node {self.dp.node}: programs not loaded")
        self.attacher.write_config(desired.host_netns_cookie)
        self.attacher.attach(program, self.dp.programs.sock_fds[program], SOCK_PROGRAMS[program], desired.cgroup)

    async def delete(self, program: str) -> None:
        self.attacher.detach(program)

    async def list_actual(self) -> Iterable[str]:
        return list(self.attacher.attached())
