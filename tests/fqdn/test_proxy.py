"""The DNS proxy core against a real upstream (the world zone served on loopback): allowed names are
forwarded and learned *before* the answer is released, denied ones get the reject code, garbage never
crashes it, and an unredirected client is dropped (fail closed)."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import time

import dns.message
import dns.rcode
import pytest

from propolis.fqdn.proxy import DnsProxy, Learned, Redirected
from propolis.model.matchpattern import FqdnSelector
from propolis_sandbox.dns_server import DnsServer, bound_sockets
from propolis_sandbox.world_dns import WorldZone

CLIENT = "10.244.1.7"
# the seed's allow-aws-egress: DNS to kube-dns with matchPattern "*", egress to these FQDNs
DNS_RULES = [FqdnSelector(match_pattern="*")]
TO_FQDNS = [FqdnSelector(match_pattern="*.amazonaws.com"), FqdnSelector(match_name="api.stripe.com")]


@pytest.fixture
async def upstream():
    udp, tcp = bound_sockets("127.0.0.1", 0)
    server = DnsServer(WorldZone().answer)
    await server.start(udp, tcp)
    yield udp.getsockname()[1]
    server.close()


async def udp_exchange(wire: bytes, where: Redirected) -> bytes:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        await loop.sock_sendto(sock, wire, (where.server_ip, where.server_port))
        return await asyncio.wait_for(loop.sock_recv(sock, 65535), 2)


def make_proxy(rules, learn, **kw) -> DnsProxy:
    return DnsProxy(lambda where: rules if where.client_ip == CLIENT else None, udp_exchange, learn,
                    lambda: TO_FQDNS, **kw)


async def ask(proxy: DnsProxy, port: int, name: str, client: str = CLIENT) -> dns.message.Message | None:
    out = await proxy.handle(dns.message.make_query(name, "A").to_wire(), Redirected(client, "127.0.0.1", port))
    return dns.message.from_wire(out) if out else None


async def test_allowed_names_are_learned_before_release(upstream):
    events = []

    async def learn(item: Learned) -> None:
        await asyncio.sleep(0.02)  # writing ipcache and policy maps takes a moment
        events.append(("learned", item.name, tuple(sorted(item.ips)), [str(s) for s in item.selectors]))

    proxy = make_proxy(DNS_RULES, learn)
    answer = await ask(proxy, upstream, "s3.amazonaws.com")
    events.append(("released",))
    assert [e[0] for e in events] == ["learned", "released"]
    assert events[0][2] == ("203.0.113.20", "203.0.113.21")
    assert sorted(rr.to_text() for rr in answer.answer[0]) == ["203.0.113.20", "203.0.113.21"]
    example = await ask(proxy, upstream, "example.org")  # allowed by the DNS rule, selected by no toFQDNs
    assert example.answer and len(events) == 2


async def test_denied_names_get_the_reject_code_and_are_not_forwarded(upstream):
    learned = []

    async def learn(item: Learned) -> None:
        learned.append(item)

    narrow = [FqdnSelector(match_pattern="*.amazonaws.com")]
    assert (await ask(make_proxy(narrow, learn), upstream, "api.stripe.com")).rcode() == dns.rcode.REFUSED
    assert (await ask(make_proxy(narrow, learn, reject="nameError"), upstream, "x.org")).rcode() == dns.rcode.NXDOMAIN
    assert learned == []
    assert await ask(make_proxy(narrow, learn), upstream, "s3.amazonaws.com", client="10.244.9.9") is None


async def test_a_slow_policy_write_holds_the_answer_at_most_the_max_delay(upstream):
    async def learn(item: Learned) -> None:
        await asyncio.sleep(1)

    proxy = make_proxy(DNS_RULES, learn, max_delay_s=0.1)
    started = time.monotonic()
    assert (await ask(proxy, upstream, "api.stripe.com")).answer
    assert 0.09 < time.monotonic() - started < 0.5 and proxy.stats["late_learns"] == 1


async def test_fuzzed_queries_get_formerr_or_nothing(upstream):
    async def learn(item: Learned) -> None:
        pass

    proxy = make_proxy(DNS_RULES, learn)
    rng = random.Random(15)
    good = dns.message.make_query("s3.amazonaws.com", "A").to_wire()
    samples = [os.urandom(rng.randint(0, 600)) for _ in range(500)]
    samples += [good[: rng.randint(0, len(good))] for _ in range(200)]  # truncated
    samples += [bytes(b ^ rng.randint(0, 255) if rng.random() < 0.1 else b for b in good) for _ in range(300)]
    samples.append(struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01")  # pointer loop
    samples.append(struct.pack("!HHHHHH", 2, 0x0100, 1, 0, 0, 0) + b"\x3f" + b"a" * 63 * 5)  # name > 255
    samples.append(struct.pack("!HHHHHH", 3, 0x0100, 60000, 0, 0, 0))  # counts that lie
    for wire in samples:
        out = await proxy.handle(wire, Redirected(CLIENT, "127.0.0.1", upstream))
        if out is not None:
            dns.message.from_wire(out)  # whatever it answers is a well-formed DNS message
    assert proxy.stats["formerr"] > 0
    assert (await ask(proxy, upstream, "api.stripe.com")).answer  # still serving
