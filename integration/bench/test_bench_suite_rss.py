"""The idle-RSS part of `propolis bench bus` covers every service of the suite, node-scoped ones included (a
smoke test, not a benchmark: no figure is compared with its target), and leaves nothing of its sandbox behind."""

from __future__ import annotations

import asyncio
import math

import pytest

from propolis.suite import SUITE_SERVICES
from propolis_sandbox.bench.suite_rss import MEASURED, sandbox_idle_rss
from propolis_sandbox.fixture import leftovers, unique_name

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


def test_sandbox_idle_rss_has_a_figure_for_every_suite_service_and_cleans_up() -> None:
    name = unique_name("rss")
    rows = asyncio.run(sandbox_idle_rss(0.5, name=name))
    assert [r["service"] for r in rows] == [s.name for s in SUITE_SERVICES]
    for r in rows:
        assert r["measured"] == MEASURED, r
        assert math.isfinite(r["idle_rss_mb"]) and 10 < r["idle_rss_mb"] < 2000, r
    left = leftovers(name)
    assert not any(left.values()), f"sandbox {name} left {left}"
