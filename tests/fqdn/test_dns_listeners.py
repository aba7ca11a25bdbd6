"""The dns-proxy's sockets on loopback against a real upstream (the world zone): UDP answers come from the
original destination, concurrent clients reusing one query id each get their own answer (the upstream
ids are rewritten), TCP messages are length-prefixed and a lying prefix only closes its connection.

Here the "original destination" is the listener itself (no BPF redirect on loopback), and the proxy's
exchange sends on to the upstream's port."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import socket
import struct

import dns.message
import dns.rcode
import pytest

from propolis.fqdn.listener import DnsListeners, UdpUpstream
from propolis.fqdn.proxy import DnsProxy, Learned, Redirected
from propolis.model.matchpattern import FqdnSelector
from propolis_sandbox.dns_server import DnsServer, bound_sockets
from propolis_sandbox.world_dns import WorldZone

pytestmark = pytest.mark.root  # IP_TRANSPARENT


@pytest.fixture
async def upstream():
    udp, tcp = bound_sockets("127.0.0.1", 0)
    server = DnsServer(WorldZone().answer)
    await server.start(udp, tcp)
    yield {"UDP": udp.getsockname()[1], "TCP": tcp.getsockname()[1]}
    server.close()


def _free_port() -> int:
    """A port free for both UDP and TCP (the listeners take both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("0.0.0.0", 0))
            try:
                udp.bind(("0.0.0.0", tcp.getsockname()[1]))
            except OSError:
                continue
            return tcp.getsockname()[1]


@pytest.fixture
async def listening(upstream):
    learned: list[Learned] = []
    up = UdpUpstream(socket.socket)
    up.start()

    async def exchange(wire: bytes, where: Redirected) -> bytes:
        return await up.exchange(wire, dataclasses.replace(where, server_port=upstream[where.protocol]))

    async def learn(item: Learned) -> None:
        learned.append(item)

    proxy = DnsProxy(lambda where: [FqdnSelector(match_pattern="*")], exchange, learn,
                     lambda: [FqdnSelector(match_pattern="*.amazonaws.com")])
    listeners = DnsListeners(proxy, socket.socket, _free_port())
    await listeners.start()
    try:
        yield listeners, learned
    finally:
        await listeners.stop()
        up.stop()


async def _udp(port: int, wire: bytes) -> tuple[bytes, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        await loop.sock_sendto(sock, wire, ("127.0.0.1", port))
        return await asyncio.wait_for(loop.sock_recvfrom(sock, 65535), 3)


async def test_udp_answers_come_from_the_original_destination_each_to_its_own_client(listening):
    listeners, learned = listening
    queries = []
    for name in ("s3.amazonaws.com.", "api.stripe.com.", "example.org.") * 10:
        q = dns.message.make_query(name, "A")
        q.id = 4242  # every client picked the same id: the upstream must still tell them apart
        queries.append(q)
    answers = await asyncio.gather(*(_udp(listeners.port, q.to_wire()) for q in queries))
    for q, (wire, source) in zip(queries, answers):
        assert source == ("127.0.0.1", listeners.port)
        a = dns.message.from_wire(wire)
        assert a.id == 4242 and a.rcode() == dns.rcode.NOERROR
        assert a.question[0].name == q.question[0].name
    assert {item.name for item in learned} == {"s3.amazonaws.com."}  # only what a toFQDNs selector wants


def _forget_reply_sockets(listeners: DnsListeners) -> None:
    """Here the original destination is the listener's own address, so the socket answering from it
    would take the next query (in a node the redirect assigns every query to the listener)."""
    for sock in listeners.reply_sockets.values():
        sock.close()
    listeners.reply_sockets.clear()


async def test_a_name_outside_the_rules_is_refused(listening):
    listeners, _ = listening
    listeners.proxy.rules_for = lambda where: [FqdnSelector(match_name="api.stripe.com")]
    wire, _ = await _udp(listeners.port, dns.message.make_query("example.org.", "A").to_wire())
    assert dns.message.from_wire(wire).rcode() == dns.rcode.REFUSED
    _forget_reply_sockets(listeners)
    wire, _ = await _udp(listeners.port, dns.message.make_query("api.stripe.com.", "A").to_wire())
    assert dns.message.from_wire(wire).rcode() == dns.rcode.NOERROR


async def test_tcp_messages_are_length_prefixed_and_a_lying_prefix_closes_only_its_connection(listening):
    listeners, _ = listening
    reader, writer = await asyncio.open_connection("127.0.0.1", listeners.port)
    writer.write(struct.pack("!H", 5000) + b"\x00" * 10)  # says 5000 bytes, sends 10, then closes
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 15) == b""
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", listeners.port)
    for name in ("s3.amazonaws.com.", "api.stripe.com."):  # two messages on one connection
        wire = dns.message.make_query(name, "A").to_wire()
        writer.write(struct.pack("!H", len(wire)) + wire)
        size, = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 3))
        answer = dns.message.from_wire(await reader.readexactly(size))
        assert answer.rcode() == dns.rcode.NOERROR and str(answer.question[0].name) == name
    writer.close()


async def test_garbage_never_stops_the_listeners(listening):
    listeners, _ = listening
    rng = random.Random(15)
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for i in range(2000):  # truncated headers, pointer loops, lying counts, random bytes
            # each to a fresh loopback address: an answered one's reply socket would take the next (see above)
            await loop.sock_sendto(sock, bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80))),
                                   (f"127.1.{i // 250}.{i % 250 + 1}", listeners.port))
            if i % 100 == 99:
                await asyncio.sleep(0.01)  # within the socket buffer (beyond it the kernel drops, as it should)
    for _ in range(20):
        reader, writer = await asyncio.open_connection("127.0.0.1", listeners.port)
        writer.write(bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 40))))
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 15)
        writer.close()
    while listeners.tasks:  # every datagram judged (answered FORMERR or dropped)
        await asyncio.sleep(0.01)
    _forget_reply_sockets(listeners)
    wire, _ = await _udp(listeners.port, dns.message.make_query("s3.amazonaws.com.", "A").to_wire())
    assert dns.message.from_wire(wire).rcode() == dns.rcode.NOERROR
    assert listeners.proxy.stats["formerr"] + listeners.proxy.stats["dropped"] >= 1900
    assert len(listeners.reply_sockets) <= 256  # bounded
