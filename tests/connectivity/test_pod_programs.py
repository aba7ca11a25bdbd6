"""The programs `connectivity test --kubeconfig` sends into a real cluster's pods, run as the pod runs them
(`python3 -c <source> ARGS`) on loopback: the echo pod names itself on TCP, UDP and HTTP; the probe reports
connected/answered_by/http_status, and a refused port in the errno's words."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from propolis.connectivity import echo, probe
from propolis.connectivity.cluster import Probe
from propolis.connectivity.kube import probe_request


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def echo_pod() -> Iterator[tuple[int, int]]:
    tcp, udp = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
    proc = subprocess.Popen([sys.executable, "-c", Path(echo.__file__).read_text(), str(tcp), str(udp)],
                            env={**os.environ, "POD_NAMESPACE": "propolis-test", "POD_NAME": "echo-same-node"})
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", tcp), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the echo program never listened"
                time.sleep(0.05)
        yield tcp, udp
    finally:
        proc.kill()
        proc.wait()


def run_probes(probes: list[Probe]) -> list[dict[str, object]]:
    out = subprocess.run([sys.executable, "-c", Path(probe.__file__).read_text(),
                          json.dumps([probe_request(p, 2.0) for p in probes])],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    results: list[dict[str, object]] = json.loads(out)
    return results


def test_probe_program_against_the_echo_program(echo_pod: tuple[int, int]) -> None:
    tcp, udp = echo_pod
    closed = free_port(socket.SOCK_STREAM)
    got = run_probes([Probe("client", "127.0.0.1", tcp), Probe("client", "127.0.0.1", udp, "UDP"),
                      Probe("client", "127.0.0.1", tcp, http=("GET", "/public")),
                      Probe("client", "127.0.0.1", closed)])
    assert got == [{"connected": True, "answered_by": "propolis-test/echo-same-node"},
                   {"connected": True, "answered_by": "propolis-test/echo-same-node"},
                   {"connected": True, "http_status": 200},
                   {"connected": False, "error": "Connection refused"}]
