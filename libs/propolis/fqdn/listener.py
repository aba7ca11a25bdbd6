"""The dns-proxy's sockets in the node namespace: transparent UDP and TCP listeners, and the upstream.

* UDP (bpf/lib/proxy.h `proxy_deliver_udp`): redirected datagrams arrive on one unconnected
  socket on ``0.0.0.0:<proxy port>`` (``IP_TRANSPARENT``); ``IP_RECVORIGDSTADDR`` gives each one's
  original destination. The answer must come from that address, so it is sent from a socket
  bound to it (``IP_TRANSPARENT`` lets a node socket own a pod's address), kept per server.
* TCP (the generic redirect): the accepted socket's local address is the original destination;
  messages are length-prefixed (RFC 1035 4.2.2) and judged one by one.
* Upstream: queries go on to the original destination from the node's own address (Cilium's
  non-transparent mode): one UDP socket, ids rewritten so concurrent clients cannot collide;
  TCP queries go on over TCP.

Bounded: at most `MAX_INFLIGHT` queries in flight (more are dropped, like a full socket buffer).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

from propolis.fqdn.proxy import DnsProxy, Redirected
from propolis.l7.redirect import IP_TRANSPARENT, transparent_listener

log = logging.getLogger("propolis.fqdn.listener")

IP_RECVORIGDSTADDR = getattr(socket, "IP_RECVORIGDSTADDR", 20)
IP_ORIGDSTADDR = IP_RECVORIGDSTADDR  # the cmsg type equals the option number
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # beyond net.core.rmem_max (CAP_NET_ADMIN)
UDP_RECEIVE_BUFFER = 4 << 20
MAX_INFLIGHT = 4096
MAX_REPLY_SOCKETS = 256
UPSTREAM_TIMEOUT_S = 2.0
TCP_IDLE_TIMEOUT_S = 10.0

MakeSocket = Callable[[int, int], socket.socket]


def original_destination(ancdata: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """The sockaddr_in of an IP_ORIGDSTADDR control message."""
    for level, kind, data in ancdata:
        if level == socket.SOL_IP and kind == IP_ORIGDSTADDR and len(data) >= 8:
            port, = struct.unpack_from("!H", data, 2)
            return socket.inet_ntoa(data[4:8]), port
    return None


class UdpUpstream:
    """One node-namespace UDP socket for every forwarded query; answers matched by (server, id)."""

    def __init__(self, make_socket: MakeSocket) -> None:
        self.make_socket = make_socket
        self.sock: socket.socket | None = None
        self.pending: dict[tuple[str, int, int], asyncio.Future[bytes]] = {}

    def start(self) -> None:
        self.sock = self.make_socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind(("0.0.0.0", 0))
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def stop(self) -> None:
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def _readable(self) -> None:
        assert self.sock is not None
        for _ in range(64):
            try:
                data, (ip, port) = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # an ICMP error for an earlier send: its query times out
            if len(data) < 12:
                continue
            fut = self.pending.pop((ip, port, struct.unpack_from("!H", data)[0]), None)
            if fut is not None and not fut.done():
                fut.set_result(data)

    async def exchange(self, wire: bytes, where: Redirected) -> bytes:
        if where.protocol == "TCP":
            return await tcp_exchange(self.make_socket, wire, where)
        assert self.sock is not None
        original = wire[:2]
        for _ in range(8):
            qid = random.getrandbits(16)
            key = (where.server_ip, where.server_port, qid)
            if key not in self.pending:
                break
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending[key] = fut
        try:
            self.sock.sendto(struct.pack("!H", qid) + wire[2:], (where.server_ip, where.server_port))
            answer = await asyncio.wait_for(fut, UPSTREAM_TIMEOUT_S)
        finally:
            self.pending.pop(key, None)
        return original + answer[2:]


async def tcp_exchange(make_socket: MakeSocket, wire: bytes, where: Redirected) -> bytes:
    sock = make_socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (where.server_ip, where.server_port)),
                               UPSTREAM_TIMEOUT_S)
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(struct.pack("!H", len(wire)) + wire)
        size, = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), UPSTREAM_TIMEOUT_S))
        return await asyncio.wait_for(reader.readexactly(size), UPSTREAM_TIMEOUT_S)
    finally:
        writer.close()


class DnsListeners:
    """The UDP and TCP listeners on the proxy port, each query handed to `DnsProxy.handle`."""

    def __init__(self, proxy: DnsProxy, make_socket: MakeSocket, port: int) -> None:
        self.proxy = proxy
        self.make_socket = make_socket
        self.port = port
        self.udp: socket.socket | None = None
        self.tcp: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.reply_sockets: OrderedDict[tuple[str, int], socket.socket] = OrderedDict()
        self.overload_drops = 0

    async def start(self) -> None:
        udp = self.make_socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        udp.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        udp.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        udp.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, UDP_RECEIVE_BUFFER)  # bursts of queries queue, not drop
        udp.bind(("0.0.0.0", self.port))
        udp.setblocking(False)
        self.udp = udp
        asyncio.get_running_loop().add_reader(udp.fileno(), self._udp_readable)
        tcp = transparent_listener(self.make_socket(socket.AF_INET, socket.SOCK_STREAM), self.port)
        self.tcp = await asyncio.start_server(self._serve_tcp, sock=tcp)
        log.info("DNS proxy listening on UDP and TCP port %d", self.port)

    async def stop(self) -> None:
        if self.udp is not None:
            asyncio.get_running_loop().remove_reader(self.udp.fileno())
            self.udp.close()
            self.udp = None
        if self.tcp is not None:
            self.tcp.close()
            await self.tcp.wait_closed()
        for task in list(self.tasks):
            task.cancel()
        for sock in self.reply_sockets.values():
            sock.close()
        self.reply_sockets.clear()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- UDP ------------------------------------------------------------------------------------
    def _udp_readable(self) -> None:
        assert self.udp is not None
        for _ in range(64):
            try:
                data, anc, _, client = self.udp.recvmsg(65535, socket.CMSG_SPACE(16))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("UDP listener: %s", exc)
                return
            server = original_destination(anc)
            if server is None:
                continue  # not redirected (someone sent to the port itself): nothing to answer as
            if len(self.tasks) >= MAX_INFLIGHT:
                self.overload_drops += 1
                continue
            self._spawn(self._udp_query(data, client[:2], server))

    async def _udp_query(self, data: bytes, client: tuple[str, int], server: tuple[str, int]) -> None:
        out = await self.proxy.handle(data, Redirected(client[0], server[0], server[1], "UDP", client[1]))
        if out is None:
            return
        try:
            self._reply_socket(server).sendto(out, client)
        except OSError as exc:
            log.info("answer to %s:%d as %s:%d: %s", *client, *server, exc)

    def _reply_socket(self, server: tuple[str, int]) -> socket.socket:
        """A socket bound to the original destination: the client must get its answer from there."""
        sock = self.reply_sockets.get(server)
        if sock is not None:
            self.reply_sockets.move_to_end(server)
            return sock
        sock = self.make_socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind(server)
        sock.setblocking(False)
        self.reply_sockets[server] = sock
        if len(self.reply_sockets) > MAX_REPLY_SOCKETS:
            _, oldest = self.reply_sockets.popitem(last=False)
            oldest.close()
        return sock

    # --- TCP ------------------------------------------------------------------------------------
    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = writer.get_extra_info("peername")[:2]
        server = writer.get_extra_info("sockname")[:2]
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT_S)
                size, = struct.unpack("!H", head)
                data = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE_TIMEOUT_S)
                out = await self.proxy.handle(data, Redirected(client[0], server[0], server[1], "TCP", client[1]))
                if out is None:
                    return  # dropped: close the connection
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return  # a length prefix that lies, an idle or gone client
        finally:
            writer.close()
