"""The connectivity `encryption` scenario's verdict on a capture: cleartext or no WireGuard fails a check."""

from __future__ import annotations

import struct

from propolis.connectivity.cluster import Probe, ProbeResult
from propolis.connectivity.probe import PROBE_PAYLOAD
from propolis.connectivity.runner import underlay_verdict
from propolis.encryption.capture import Frame, UnderlayCapture, parse

RESULT = ProbeResult(Probe("client", "10.244.2.2", 8080, "TCP", target="pod:echo-other-node"), True,
                     answered_by="propolis-test/echo-other-node")


def capture(*frames: Frame) -> UnderlayCapture:
    cap = UnderlayCapture("unused")
    cap.frames.extend(frames)
    return cap


def udp_frame(sport: int, dport: int, payload: bytes) -> bytes:
    ip = bytes([0x45, 0]) + struct.pack("!H", 20 + 8 + len(payload)) + bytes(5) + bytes([17]) + bytes(10)
    return bytes(12) + b"\x08\x00" + ip + struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def test_parse_reads_ports_of_an_ipv4_udp_frame():
    assert parse(udp_frame(40000, 51871, b"x")).__dict__ | {"data": b""} == \
        {"proto": 17, "sport": 40000, "dport": 51871, "data": b""}


def test_only_wireguard_and_no_cleartext_passes():
    ok, detail = underlay_verdict(capture(parse(udp_frame(51871, 51871, b"\x04" * 64))), RESULT, "connected")
    assert ok and "1 frames UDP 51871, no cleartext" in detail


def test_cleartext_payload_or_answer_fails():
    for leaked in (PROBE_PAYLOAD, b"propolis-test/echo-other-node propolis-probe"):
        ok, detail = underlay_verdict(capture(parse(udp_frame(51871, 51871, b"\x04" * 64)),
                                              parse(udp_frame(33000, 8080, leaked))), RESULT, "connected")
        assert not ok and "CLEARTEXT" in detail


def test_no_wireguard_at_all_fails():
    ok, detail = underlay_verdict(capture(), RESULT, "connected")
    assert not ok and "no WireGuard" in detail
