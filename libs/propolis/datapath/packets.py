"""Hand-built Ethernet/IPv4 packets for BPF_PROG_TEST_RUN (tests and `propolis bench policy`).

Why hand-built: the programs read a handful of header fields; a few struct.pack calls
make exact packets (flags, fragments, ICMP ids) without a packet library.
"""

from __future__ import annotations

import socket
import struct

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10

_SRC_MAC = bytes.fromhex("0a0000000001")
_DST_MAC = bytes.fromhex("0a0000000002")


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def ethernet(payload: bytes, ethertype: int = ETH_P_IP) -> bytes:
    return _DST_MAC + _SRC_MAC + struct.pack("!H", ethertype) + payload


def ipv4(src: str, dst: str, protocol: int, l4: bytes, *, frag_off: int = 0, ttl: int = 64) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0x1234, frag_off, ttl, protocol, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + l4


def tcp(src: str, sport: int, dst: str, dport: int, flags: int = TCP_SYN, payload: bytes = b"") -> bytes:
    segment = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) + payload
    return ethernet(ipv4(src, dst, socket.IPPROTO_TCP, segment))


def udp(src: str, sport: int, dst: str, dport: int, payload: bytes = b"x" * 16) -> bytes:
    datagram = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return ethernet(ipv4(src, dst, socket.IPPROTO_UDP, datagram))


def sctp(src: str, sport: int, dst: str, dport: int) -> bytes:
    common = struct.pack("!HHII", sport, dport, 0, 0)
    return ethernet(ipv4(src, dst, 132, common))


def icmp(src: str, dst: str, icmp_type: int = 8, code: int = 0, ident: int = 0x4242, seq: int = 1) -> bytes:
    message = struct.pack("!BBHHH", icmp_type, code, 0, ident, seq) + b"ping"
    message = message[:2] + struct.pack("!H", _checksum(message)) + message[4:]
    return ethernet(ipv4(src, dst, socket.IPPROTO_ICMP, message))


def udp_fragment(src: str, sport: int, dst: str, dport: int) -> bytes:
    datagram = struct.pack("!HHHH", sport, dport, 8 + 16, 0) + b"y" * 16
    return ethernet(ipv4(src, dst, socket.IPPROTO_UDP, datagram, frag_off=0x2000))  # MF set


def udp_later_fragment(src: str, dst: str, payload: bytes = b"z" * 16, *, more: bool = False) -> bytes:
    """A non-first fragment (offset 24 bytes) of the datagram `udp_fragment` starts: no UDP header."""
    return ethernet(ipv4(src, dst, socket.IPPROTO_UDP, payload, frag_off=(0x2000 if more else 0) | 3))


def ipv6_stub() -> bytes:
    return ethernet(b"\x60" + b"\0" * 39, ETH_P_IPV6)


def icmp_error(src: str, dst: str, quoted: bytes, icmp_type: int = 3, code: int = 3) -> bytes:
    """ICMP error (default: port unreachable) quoting `quoted` (an Ethernet frame from this module)."""
    inner = quoted[14:14 + 28]  # IP header + 8 bytes, as routers quote it
    message = struct.pack("!BBHI", icmp_type, code, 0, 0) + inner
    message = message[:2] + struct.pack("!H", _checksum(message)) + message[4:]
    return ethernet(ipv4(src, dst, socket.IPPROTO_ICMP, message))
