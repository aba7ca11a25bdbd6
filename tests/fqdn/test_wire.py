"""The proxy's answer reader agrees with dnspython on real answers and fails only with WireError on bad ones."""

from __future__ import annotations

import random
import struct

import dns.message
import dns.rrset
import pytest

from propolis.fqdn.wire import WireError, answer_a_records, read_name


def answer(qname: str, rrsets: list[dns.rrset.RRset]) -> bytes:
    msg = dns.message.make_response(dns.message.make_query(qname, "A"))
    msg.answer.extend(rrsets)
    return msg.to_wire()  # dnspython compresses names: pointers are exercised


def test_a_records_with_cname_chain_and_compression():
    wire = answer("www.Example.org", [
        dns.rrset.from_text("www.example.org.", 300, "IN", "CNAME", "edge.example.net."),
        dns.rrset.from_text("edge.example.net.", 30, "IN", "A", "198.51.100.81", "198.51.100.82"),
        dns.rrset.from_text("edge.example.net.", 30, "IN", "AAAA", "2001:db8::1")])
    [(owner, ips, ttl)] = answer_a_records(wire)
    assert (owner, sorted(ips), ttl) == ("edge.example.net.", ["198.51.100.81", "198.51.100.82"], 30)


def test_names_up_to_the_limit():
    name = ".".join(["a" * 63] * 3 + ["b" * 61]) + "."  # 255 octets on the wire
    wire = answer(name, [dns.rrset.from_text(name, 5, "IN", "A", "203.0.113.9")])
    assert answer_a_records(wire) == [(name, ["203.0.113.9"], 5)]


@pytest.mark.parametrize("wire", [
    b"", b"\x00" * 11,
    struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + b"\xc0\x0c",  # pointer to itself
    struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + b"\xc0\x20\x00",  # forward pointer
    struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + b"\x3f" + b"a" * 10,  # label past the end
    struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + (b"\x3f" + b"a" * 63) * 5 + b"\x00",  # name over 255
    struct.pack("!HHHHHH", 1, 0x8180, 0, 3, 0, 0) + b"\x00\x00\x01\x00\x01",  # answer counts that lie
])
def test_malformed_answers_raise_wire_error(wire):
    with pytest.raises(WireError):
        answer_a_records(wire)


def test_random_mutations_never_raise_anything_else():
    rng = random.Random(20)
    good = answer("s3.amazonaws.com", [dns.rrset.from_text("s3.amazonaws.com.", 60, "IN", "A", "203.0.113.20")])
    for _ in range(5000):
        wire = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            wire[rng.randrange(len(wire))] = rng.randrange(256)
        wire = bytes(wire[: rng.randint(0, len(wire))]) if rng.random() < 0.3 else bytes(wire)
        try:
            answer_a_records(wire)
        except WireError:
            pass
    assert read_name(b"\x02ab\x00", 0) == ("ab.", 4)
