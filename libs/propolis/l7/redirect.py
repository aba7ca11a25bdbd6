"""The redirect contract between the policy compiler, the datapath and a local proxy.

A policy entry carries a proxy port (`propolis.policy.proxy_ports`); bpf/lib/proxy.h hands every packet of such a connection to
the socket listening on that port in the node namespace, keeping the original destination (the
accepted socket's local address). Any proxy (the L7 proxy, the dns-proxy) follows it:

* listen on ``0.0.0.0:<port>`` with ``IP_TRANSPARENT`` (`transparent_listener`);
* the node has the policy route for ``MARK_MAGIC_TO_PROXY`` (`install_proxy_route`): marked
  packets are delivered locally whatever their destination;
* connect onward with ``IP_TRANSPARENT``, bound to the client's address, with ``SO_MARK``
  ``MARK_MAGIC_PROXY_UPSTREAM | direction`` (`upstream_socket`), so the server's own L3/L4 policy
  still applies and its replies come back to the proxy socket.

* no TCP early demux in the node namespace (`NODE_SYSCTLS`): a proxy socket holds a pod's 4-tuple
  there, so early demux would attach it to that connection's packets arriving from another node
  before the datapath marked them, and the stack drops a packet to forward that has a socket.

No listener on the port = the datapath drops the flow (fail closed).
Numbers mirror bpf/lib/proxy.h.
"""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyroute2 import IPRoute

MARK_MASK = 0xFFFF0000
MARK_MAGIC_TO_PROXY = 0x4C500000
MARK_MAGIC_PROXY_UPSTREAM = 0x4C550000
PROXY_UPSTREAM = {"ingress": 1, "egress": 2}
PROXY_ROUTE_TABLE = 2004  # Cilium's proxy routing table number
PROXY_RULE_PRIORITY = 9

NODE_SYSCTLS = {"net.ipv4.tcp_early_demux": "0"}

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
SO_MARK = getattr(socket, "SO_MARK", 36)


def transparent_listener(sock: socket.socket, port: int, backlog: int = 1024) -> socket.socket:
    """Make `sock` (a TCP socket created in the node namespace) the proxy listener on `port`."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    _no_delay(sock)  # accepted sockets inherit it
    sock.bind(("0.0.0.0", port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def _no_delay(sock: socket.socket) -> None:
    """TCP_NODELAY: a response written as head then body must not wait for the peer's delayed ACK (40 ms).
    asyncio sets it only on sockets made with proto IPPROTO_TCP; the node-namespace sockets have proto 0."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def upstream_socket(sock: socket.socket, client_ip: str, direction: str) -> socket.socket:
    """Prepare `sock` (TCP, node namespace) to connect onward as the client's address."""
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK_MAGIC_PROXY_UPSTREAM | PROXY_UPSTREAM[direction])
    _no_delay(sock)
    sock.bind((client_ip, 0))
    sock.setblocking(False)
    return sock


def install_proxy_route(ipr: IPRoute) -> None:
    """Idempotently install the policy route for marked packets (pyroute2 IPRoute in the node netns)."""
    try:
        ipr.route("add", dst="0.0.0.0/0", type="local", scope="host", oif=ipr.link_lookup(ifname="lo")[0],
                  table=PROXY_ROUTE_TABLE)
    except Exception as exc:  # pyroute2 raises NetlinkError
        if getattr(exc, "code", None) != errno.EEXIST:
            raise
    try:
        ipr.rule("add", fwmark=MARK_MAGIC_TO_PROXY, fwmask=MARK_MASK, table=PROXY_ROUTE_TABLE,
                 priority=PROXY_RULE_PRIORITY)
    except Exception as exc:
        if getattr(exc, "code", None) != errno.EEXIST:
            raise


def prepare_node(netns: str | None) -> None:
    """The node's proxy sysctls and policy route (idempotent: each proxy of the node runs it before listening).
    ``netns`` None = the calling process's namespace."""
    from propolis.runtime.netns import iproute_in, write_sysctl

    if netns:
        for key, value in NODE_SYSCTLS.items():
            write_sysctl(netns, key, value)
        with iproute_in(netns) as ipr:
            install_proxy_route(ipr)
    else:
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            install_proxy_route(ipr)
