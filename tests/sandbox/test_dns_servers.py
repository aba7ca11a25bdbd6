"""The sandbox DNS servers on real loopback sockets: the world zone's answers (several addresses, rotation,
TTLs, NXDOMAIN), kube-dns's cluster names, and bad input answered with FORMERR or dropped, never a crash."""

from __future__ import annotations

import asyncio
import socket
import struct

import dns.message
import dns.rcode
import pytest

from propolis_sandbox.dns_server import DnsServer, bound_sockets
from propolis_sandbox.kube_dns import ClusterRecords
from propolis_sandbox.world import WORLD_ZONE
from propolis_sandbox.world_dns import WorldZone


@pytest.fixture
async def world_server():
    udp, tcp = bound_sockets("127.0.0.1", 0)
    server = DnsServer(WorldZone().answer)
    await server.start(udp, tcp)
    yield udp.getsockname()[1], tcp.getsockname()[1]
    server.close()


async def udp_exchange(port: int, wire: bytes, timeout: float = 0.5) -> bytes | None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        await loop.sock_sendto(sock, wire, ("127.0.0.1", port))
        return await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)
    except TimeoutError:
        return None
    finally:
        sock.close()


async def query(port: int, name: str) -> dns.message.Message:
    return dns.message.from_wire(await udp_exchange(port, dns.message.make_query(name, "A").to_wire()))


async def test_world_zone_answers(world_server):
    port, _ = world_server
    s3 = await query(port, "S3.AmazonAWS.com")  # case-insensitive
    assert sorted(rr.to_text() for rr in s3.answer[0]) == sorted(WORLD_ZONE["s3.amazonaws.com."].addresses)
    assert s3.answer[0].ttl == WORLD_ZONE["s3.amazonaws.com."].ttl
    assert (await query(port, "long-ttl.example.net")).answer[0].ttl == 86400
    rotating = [(await query(port, "rotating.example.net")).answer[0][0].to_text() for _ in range(3)]
    assert len(set(rotating)) == 3
    assert (await query(port, "nowhere.example.org")).rcode() == dns.rcode.NXDOMAIN


async def test_garbage_gets_formerr_or_nothing(world_server):
    port, tcp_port = world_server
    assert await udp_exchange(port, b"\x01") is None  # not even a header: dropped
    bad_label = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01"
    reply = await udp_exchange(port, bad_label)
    assert reply is not None and struct.unpack("!H", reply[:2])[0] == 7 and reply[3] & 0xF == dns.rcode.FORMERR
    loop_ptr = struct.pack("!HHHHHH", 8, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    assert (await udp_exchange(port, loop_ptr))[3] & 0xF == dns.rcode.FORMERR  # compression loop
    response = bytearray(dns.message.make_query("example.org", "A").to_wire())
    response[2] |= 0x80  # a response: never answered (no reflection)
    assert await udp_exchange(port, bytes(response)) is None
    reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port)
    writer.write(struct.pack("!H", 500) + b"short")  # a length prefix that lies: the connection just ends
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()
    assert (await query(port, "example.org")).answer  # and it still answers


def test_kube_dns_cluster_names():
    records = ClusterRecords("http://unused")
    records.services[("shop", "web")] = "10.96.0.20"
    records.pods[("shop", "web-1")] = "10.244.1.5"
    assert records.lookup("web.shop.svc.cluster.local") == (True, ["10.96.0.20"])
    assert records.lookup("10-244-1-5.shop.pod.cluster.local") == (True, ["10.244.1.5"])
    assert records.lookup("10-244-1-5.other.pod.cluster.local") == (True, [])  # pods verified: wrong namespace
    assert records.lookup("nope.shop.svc.cluster.local") == (True, [])
    assert records.lookup("s3.amazonaws.com") == (False, [])
