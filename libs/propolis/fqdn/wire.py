"""The few fields of a DNS answer the proxy needs, read straight from the wire.

Why not dnspython here: building a full `dns.message.Message` for every upstream answer costs
~5x the query's parse and dominates the proxy's time per query; the proxy only needs the
answer section's A records (owner, addresses, TTL) before releasing the bytes unchanged.
Queries are still parsed (and refused, and answered) with dnspython. Bounds-checked: every
read is checked against the length, compression pointers may only point backwards and at
most 128 are followed; anything else is `WireError`.
"""

from __future__ import annotations

import ipaddress
import struct

MAX_POINTERS = 128
MAX_NAME = 255
TYPE_A = 1
CLASS_IN = 1


class WireError(ValueError):
    """A malformed message: the proxy answers SERVFAIL rather than release what it cannot read."""


def read_name(wire: bytes, offset: int) -> tuple[str, int]:
    """(lower-case name with trailing dot, offset after the name in the record)."""
    labels: list[str] = []
    length = 0
    end = -1
    hops = 0
    pos = offset
    while True:
        if pos >= len(wire):
            raise WireError("name runs past the message")
        n = wire[pos]
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(wire):
                raise WireError("truncated compression pointer")
            target = ((n & 0x3F) << 8) | wire[pos + 1]
            if end < 0:
                end = pos + 2
            hops += 1
            if hops > MAX_POINTERS or target >= pos:
                raise WireError("compression pointer loop or forward pointer")
            pos = target
            continue
        if n & 0xC0:
            raise WireError("unknown label type")
        pos += 1
        if n == 0:
            break
        if pos + n > len(wire):
            raise WireError("label runs past the message")
        length += n + 1
        if length > MAX_NAME:
            raise WireError("name longer than 255 octets")
        labels.append(wire[pos:pos + n].decode("ascii", "replace").lower())
        pos += n
    return ".".join(labels) + ".", (end if end >= 0 else pos)


def answer_a_records(wire: bytes) -> list[tuple[str, list[str], int]]:
    """[(owner, addresses, min TTL)] of the answer section's IN A records, grouped by owner in order."""
    if len(wire) < 12:
        raise WireError("shorter than a header")
    qdcount, ancount = struct.unpack_from("!HH", wire, 4)
    pos = 12
    for _ in range(qdcount):
        _, pos = read_name(wire, pos)
        pos += 4
    grouped: dict[str, tuple[list[str], int]] = {}
    for _ in range(ancount):
        owner, pos = read_name(wire, pos)
        if pos + 10 > len(wire):
            raise WireError("truncated resource record")
        rtype, rclass, ttl, rdlength = struct.unpack_from("!HHIH", wire, pos)
        pos += 10
        if pos + rdlength > len(wire):
            raise WireError("rdata runs past the message")
        if rtype == TYPE_A and rclass == CLASS_IN and rdlength == 4:
            ips, low = grouped.get(owner, ([], ttl))
            ips.append(str(ipaddress.IPv4Address(wire[pos:pos + 4])))
            grouped[owner] = (ips, min(low, ttl))
        pos += rdlength
    return [(owner, ips, ttl) for owner, (ips, ttl) in grouped.items()]
