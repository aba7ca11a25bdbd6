"""`propolis bench l7` runs end to end with tiny sizes (a smoke test, not a benchmark: no figure is compared
with a target on this shared machine): the direct run is not judged by the proxy, the proxied run is
(a request its rules do not allow is refused), and every figure is a finite positive number."""

from __future__ import annotations

import math

import pytest

from propolis_sandbox.bench import l7

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


def test_bench_l7_tiny_run_measures_direct_and_proxied_http_and_grpc():
    doc = l7.run(seconds=0.5, rate=50)
    assert doc["direct_judged_by_proxy"] is False and doc["proxy_judged_by_proxy"] is True
    for protocol in ("http", "grpc"):
        for mode in ("direct", "proxy"):
            figures = doc[protocol][mode]
            assert figures["rps_1_connection"] > 0 and figures["rps_50_connections"] > 0
            assert math.isfinite(figures["paced"]["p99_ms"]) and figures["paced"]["p50_ms"] > 0
        assert set(doc[protocol]["proxy_share_of_direct_rps"]) == {"1_connection", "50_connections"}
    assert 0 < doc["proxy_idle_rss_mb"] < 1000 and {"h2", "grpcio"} <= set(doc["versions"])
