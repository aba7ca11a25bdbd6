"""The `probe --all` outputs: JSON records and the e2e-style truth table."""

from __future__ import annotations

import pytest

from propolis.errors import ValidationError
from propolis_sandbox.probe import Matrix, ProbeResult, ProbeSpec, http_request, http_status


def result(src: str, dst: str, ok: bool, protocol: str = "TCP", port: int = 80) -> ProbeResult:
    return ProbeResult(ProbeSpec(f"pp-s-{src}", "10.0.0.1", port, protocol, from_label=src, to_label=dst), ok)


def test_json_record_has_the_documented_keys() -> None:
    record = result("x/a", "x/b", True).to_json()
    assert {k: record[k] for k in ("from", "to", "port", "protocol", "connected")} == \
        {"from": "x/a", "to": "x/b", "port": 80, "protocol": "TCP", "connected": True}


def test_matrix_marks_connected_and_blocked() -> None:
    results = [result("x/a", "x/a", True), result("x/a", "x/b", False), result("x/b", "x/a", True),
               result("x/b", "x/b", True), result("x/a", "x/b", True, "UDP", 53)]
    text = Matrix.from_results(results).render()
    tcp = text.split("TCP/80:")[1].split("UDP/53:")[0]
    assert "x/a      .  X" in tcp and "x/b      .  ." in tcp and "3/4 connected" in tcp
    assert "UDP/53:" in text and "1/1 connected" in text


def test_bad_probe_specs_are_refused() -> None:
    with pytest.raises(ValidationError):
        ProbeSpec("ns", "10.0.0.1", 0)
    with pytest.raises(ValidationError):
        ProbeSpec("ns", "10.0.0.1", 80, "ICMP")


def test_http_probe_request_and_status() -> None:
    spec = ProbeSpec("ns", "10.0.0.1", 8080, http=("DELETE", "/api/v1/users"), headers=(("X-Env", "prod"),))
    assert http_request(spec) == (b"DELETE /api/v1/users HTTP/1.1\r\nHost: 10.0.0.1:8080\r\nX-Env: prod\r\n"
                                  b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    assert http_status(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 15\r\n\r\nAccess denied\r\n") == 403
    assert http_status(b"x/a propolis-probe") is None
    record = ProbeResult(spec, True, http_status=403).to_json()
    assert (record["connected"], record["http_status"]) == (True, 403)
