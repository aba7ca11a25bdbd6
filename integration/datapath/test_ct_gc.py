"""Conntrack GC with real packets (issue 12): a pass deletes expired entries and keeps live connections,
counts what it collected in its metric, and `propolis bpf ct flush` empties the tables.

Expiry is the one staged step: the UDP flows' lifetimes are moved into the past (waiting out the 60 s
non-TCP lifetime would only slow the test). Whether the live connection's entries survived is told
by packets: pod b enforces deny-all ingress during the check, so its established connection keeps
flowing only through its conntrack entry, while a new connection is dropped.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import prometheus_client
import pytest
from datapath_topology import tcp_probe, udp_probe
from pyroute2.netns import create_socket

from propolis.maps import conntrack
from propolis.writer.ct_gc import ConntrackGC

pytestmark = pytest.mark.root


def test_gc_deletes_expired_entries_and_keeps_live_connections_then_flush_empties(node):
    dp, b, c = node.dp, node.pods["b"], node.pods["c"]
    dp.set_policy(b.endpoint_id, [])
    live = create_socket(c.netns, socket.AF_INET, socket.SOCK_STREAM, flags=0)
    try:
        live.settimeout(2)
        live.connect((b.ip, 8080))
        live.sendall(b"hello")
        assert live.recv(16) == b"hello"
        assert udp_probe(c, b.ip, 5353) and udp_probe(c, b.ip, 5353)  # two flows (two source ports)

        ct = dp._map(conntrack.ANY_SPEC.pin_name)
        aged = 0
        for key, value in list(ct.items()):
            if socket.ntohs(key.dport) == 5353 or socket.ntohs(key.sport) == 5353:
                value.lifetime = conntrack.now_seconds() - 5
                ct.update(key, value)
                aged += 1
        assert aged >= 2, "the UDP flows created no conntrack entries"
        live_rows = [r for r in dp.conntrack() if r.protocol == 6 and 8080 in (r.dport, r.sport)]
        assert live_rows, "the live TCP connection has no conntrack entry"

        dp.set_enforcement(b.endpoint_id, ingress=True, egress=False)  # deny-all ingress from now on
        registry = prometheus_client.CollectorRegistry()
        gc = ConntrackGC(dp, registry)
        results = gc.run_once()

        assert sum(r.deleted for r in results) == aged
        assert not [r for r in dp.conntrack() if 5353 in (r.dport, r.sport)], "expired entries kept"
        assert [r for r in dp.conntrack() if r.protocol == 6 and 8080 in (r.dport, r.sport)], "live entry deleted"
        live.sendall(b"after-gc")
        assert live.recv(16) == b"after-gc", "the live connection broke"
        assert not tcp_probe(c, b.ip, 8080), "deny-all not enforced: the survival above proves nothing"
        assert registry.get_sample_value("propolis_conntrack_gc_deleted_entries_total",
                                         {"family": "ipv4", "protocol": "non-TCP"}) == aged
        assert registry.get_sample_value("cilium_datapath_conntrack_gc_entries",
                                         {"family": "ipv4", "protocol": "TCP", "status": "alive"}) >= 1
        assert gc.status()["runs"] == 1 and gc.status()["adaptive"]

        flush = subprocess.run([sys.executable, "-m", "propolis.cli.main", "bpf", "ct", "flush",
                                "--pin-dir", dp.pin_dir, "-o", "json"], capture_output=True, text=True, timeout=30)
        assert flush.returncode == 0, flush.stderr
        flushed = json.loads(flush.stdout)["flushed"]
        assert flushed["cilium_ct4_global"] >= len(live_rows) and not dp.conntrack(), flushed
        live.sendall(b"after-flush")  # now NEW to b's deny-all ingress: dropped
        live.settimeout(1)
        with pytest.raises(TimeoutError):
            live.recv(16)
    finally:
        live.close()
        dp.set_enforcement(b.endpoint_id, ingress=False, egress=False)
