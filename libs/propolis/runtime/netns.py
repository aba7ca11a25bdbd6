"""Acting inside another network namespace from a thread of this process.

A hostNetwork agent (the datapath-writer, the proxies) acts on a node's or pod's
namespace by opening a socket *inside* it — switching the calling thread in with
setns(2), creating the socket, switching back — then using that socket from
anywhere: sockets keep the namespace they were created in. setns(CLONE_NEWNET)
only affects the calling thread, so this is safe in threaded and asyncio programs
as long as nothing awaits between the switch and the switch back (`entered` is
synchronous).
"""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import IPRoute

from propolis.errors import TemporaryError

#: Where `ip netns` keeps named namespaces (`ip netns add NAME` bind-mounts here).
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
#: The namespace this process started in (the main thread's): every switch returns here.
_ROOT_NETNS_FD = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_path(name_or_path: str) -> str:
    """A namespace name (`pp-s-1`) or an absolute path (`/proc/123/ns/net`, CNI_NETNS) -> path."""
    return name_or_path if name_or_path.startswith("/") else str(NETNS_DIR / name_or_path)


@contextmanager
def entered(netns: str) -> Iterator[None]:
    """Run the calling thread inside `netns` for the duration of the block (no awaits inside!)."""
    try:
        fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise TemporaryError(f"network namespace {netns} does not exist") from exc
    try:
        _setns(fd)
        try:
            yield
        finally:
            _setns(_ROOT_NETNS_FD)
    finally:
        os.close(fd)


def iproute_in(netns: str) -> IPRoute:
    """An rtnetlink socket bound to `netns`; the caller closes it."""
    with entered(netns):
        return IPRoute()


def socket_in(netns: str, family: int, kind: int) -> socket.socket:
    """A non-blocking socket living in `netns` (for probes and pod servers)."""
    with entered(netns):
        sock = socket.socket(family, kind)
    sock.setblocking(False)
    return sock


def write_sysctl(netns: str, key: str, value: str) -> None:
    """Write /proc/sys/<key> (dots -> slashes) as seen from inside `netns`."""
    with entered(netns):
        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(value)
