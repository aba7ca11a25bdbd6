"""A small DNS server over UDP and TCP (dnspython): the transport both sandbox DNS servers share.

Why one: the world's authoritative DNS and the cluster's kube-dns differ only in how
they answer a query, so the wire handling (UDP datagrams, TCP length prefixes,
FORMERR for what does not parse, bounded TCP reads) lives here once. Sockets are
passed in already bound, so a caller can create them in another network namespace.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.rcode

log = logging.getLogger("propolis_sandbox.dns_server")

#: answer(query) -> response (None: drop the query)
Answer = Callable[[dns.message.Message], Awaitable["dns.message.Message | None"]]
TCP_IDLE_TIMEOUT_S = 10.0
MAX_UDP_RESPONSE = 512


def formerr(wire: bytes) -> bytes | None:
    """FORMERR for a query whose header at least parses (its id echoed); None: not even a header, drop."""
    if len(wire) < 12:
        return None
    qid, flags = struct.unpack("!HH", wire[:4])
    if flags & 0x8000:  # a response: never answer those (no reflection loops)
        return None
    return struct.pack("!HHHHHH", qid, 0x8000 | (flags & 0x7800) | dns.rcode.FORMERR, 0, 0, 0, 0)


async def handle_wire(answer: Answer, wire: bytes, *, max_size: int) -> bytes | None:
    try:
        query = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, IndexError, struct.error):
        return formerr(wire)
    if query.flags & dns.flags.QR or len(query.question) != 1:
        return formerr(wire) if not query.flags & dns.flags.QR else None
    try:
        response = await answer(query)
    except Exception:  # one bad query must not stop the server
        log.exception("answering %s failed", query.question[0])
        response = dns.message.make_response(query)
        response.set_rcode(dns.rcode.SERVFAIL)
    if response is None:
        return None
    return response.to_wire(max_size=max_size)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport has DatagramTransport's methods without subclassing it
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        asyncio.ensure_future(self._reply(data, addr))

    async def _reply(self, data: bytes, addr: tuple[str, int]) -> None:
        out = await handle_wire(self.answer, data, max_size=MAX_UDP_RESPONSE)
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)


class DnsServer:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.closers: list[Callable[[], None]] = []

    async def start(self, udp: socket.socket, tcp: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self.answer), sock=udp)
        server = await asyncio.start_server(self._tcp, sock=tcp)
        self.closers += [transport.close, server.close]

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT_S))[0]
                wire = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE_TIMEOUT_S)
                out = await handle_wire(self.answer, wire, max_size=65535)
                if out is None:
                    return
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        for close in self.closers:
            close()


def bound_sockets(address: str, port: int = 53) -> tuple[socket.socket, socket.socket]:
    """(UDP, listening TCP) sockets bound to address:port in the calling thread's namespace."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((address, port))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((address, port))
    tcp.listen(128)
    for sock in (udp, tcp):
        sock.setblocking(False)
    return udp, tcp
