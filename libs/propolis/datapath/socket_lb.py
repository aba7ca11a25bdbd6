"""Socket LB (Cilium's socketLB): bpf_sock.c's cgroup programs on the node's cgroup (v2).

Why a cgroup of the node's own: a cgroup program acts on every socket of every process in
its cgroup and below. Cilium attaches at the host's cgroup root because a host is one node;
on a machine running several sandbox nodes (and everything else) the root is the whole
machine, so each sandbox node gets its own cgroup and the node's processes run in it
(`--cgroup-root`). The programs additionally translate only sockets of the node's network
namespace (its cookie in `cilium_lb_sock_config`): socketLB.hostNamespaceOnly.

Why bpf_link (BPF_LINK_CREATE) instead of BPF_PROG_ATTACH: a link is pinned under the node's
bpffs (`<pin dir>/links/socketlb/<program>`), survives a writer restart like tc filters do,
takes a new build's program atomically (BPF_LINK_UPDATE), and detaches only through itself,
so nothing else attached to the cgroup is ever touched.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from dataclasses import dataclass

from propolis.errors import PermanentError, TemporaryError
from propolis.maps import bpf, sock
from propolis.runtime.netns import socket_in

#: under the node's pin dir (Cilium: /sys/fs/bpf/cilium/socketlb/links/cgroup/)
LINKS_DIR = os.path.join("links", "socketlb")


def cgroup2_mount(mounts: str = "/proc/self/mounts") -> str:
    """Where cgroup v2 is mounted here (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid host)."""
    with open(mounts) as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return fields[1]
    raise PermanentError("no cgroup2 file system is mounted: socket LB attaches to a cgroup v2")


def cgroup_id(path: str) -> int:
    """The kernel's id of a cgroup v2 directory (its inode number, what link info reports)."""
    return os.stat(path).st_ino


def host_netns_cookie(netns: str | None) -> int:
    """The cookie of the node's network namespace (None = this process's)."""
    sk = socket_in(netns, socket.AF_INET, socket.SOCK_DGRAM) if netns else socket.socket(socket.AF_INET,
                                                                                          socket.SOCK_DGRAM)
    with sk:
        return sock.netns_cookie(sk)


@dataclass(frozen=True)
class SockAttachment:
    """One socket-LB program attached to the node's cgroup, translating for one network namespace."""

    cgroup: str
    host_netns_cookie: int


class SocketLbAttacher:
    """The node's socket-LB links and config row. Every call reads the kernel (the pins, the links'
    info), never a cache: the reconciler's actual state."""

    def __init__(self, pin_dir: str) -> None:
        self.pin_dir = pin_dir
        self.links_dir = os.path.join(pin_dir, LINKS_DIR)

    def link_path(self, program: str) -> str:
        return os.path.join(self.links_dir, program)

    def write_config(self, host_netns_cookie: int) -> None:
        with sock.CONFIG_SPEC.open(self.pin_dir) as config:
            if getattr(config.lookup(ctypes.c_uint32(0)), "host_netns_cookie", None) != host_netns_cookie:
                config.update(ctypes.c_uint32(0), sock.config_value(host_netns_cookie))

    def attach(self, program: str, prog_fd: int, attach_type: int, cgroup: str) -> None:
        """Attach (or re-point) `program` on `cgroup`: a live link there with another program gets this
        one atomically; a link that lost its cgroup (detached by hand, cgroup removed) is replaced."""
        try:
            cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TemporaryError(f"socket LB: cgroup {cgroup} does not exist") from None
        try:
            want_cgroup = os.fstat(cg_fd).st_ino
            path = self.link_path(program)
            link = self._open_link(path)
            if link is not None:
                try:
                    info = bpf.link_info(link)
                    if info.cgroup_id == want_cgroup and info.attach_type == attach_type:
                        if info.prog_id != bpf.prog_id(prog_fd):
                            bpf.link_update(link, prog_fd)
                        return
                    if info.cgroup_id:
                        bpf.link_detach(link)
                finally:
                    os.close(link)
                os.unlink(path)
            os.makedirs(self.links_dir, exist_ok=True)
            try:
                link = bpf.link_create(prog_fd, cg_fd, attach_type)
            except bpf.BpfError as exc:
                raise PermanentError(f"socket LB: attach {program} to cgroup {cgroup}: {exc}") from exc
            try:
                bpf.obj_pin(link, path)
            finally:
                os.close(link)
        finally:
            os.close(cg_fd)

    def detach(self, program: str) -> None:
        """Detach `program` from wherever its link is (missing = done)."""
        path = self.link_path(program)
        link = self._open_link(path)
        if link is None:
            return
        try:
            if bpf.link_info(link).cgroup_id:
                bpf.link_detach(link)
        finally:
            os.close(link)
        os.unlink(path)

    def attached(self) -> dict[str, bpf.LinkInfo]:
        """program -> its link, for every pinned socket-LB link still attached to a cgroup."""
        out: dict[str, bpf.LinkInfo] = {}
        try:
            names = os.listdir(self.links_dir)
        except FileNotFoundError:
            return out
        for name in names:
            link = self._open_link(self.link_path(name))
            if link is None:
                continue
            try:
                info = bpf.link_info(link)
            finally:
                os.close(link)
            out[name] = info
        return out

    @staticmethod
    def _open_link(path: str) -> int | None:
        try:
            return bpf.obj_get(path)
        except FileNotFoundError:
            return None
        except bpf.BpfError as exc:
            if exc.errno == errno.EINVAL:  # something else is pinned there
                os.unlink(path)
                return None
            raise
