"""Conntrack garbage collection on a schedule that adapts to how full the tables are (Cilium's ctmap GC).

Expired entries are already ignored by the datapath, but they occupy the LRU maps: left alone, a busy
node evicts live connections to make room for new ones. Like Cilium without `conntrack-gc-interval`,
the interval starts at 5 minutes and follows the ratio deleted / map size of the last pass: above 25 %
it shrinks (to 10 % at a 90 % ratio, never under 10 s), under 5 % it grows by half (up to
`conntrack-gc-max-interval`, 12 h). A fixed interval turns the adaptation off. The only writer that
deletes entries on a schedule; the datapath creates them, `ct flush` empties them.
"""

from __future__ import annotations

import asyncio
import logging
import time

import prometheus_client

from propolis.datapath.datapath import Datapath
from propolis.maps.conntrack import GcResult

log = logging.getLogger("propolis.ct_gc")

GC_STARTING_INTERVAL = 300.0  # Cilium's defaults.ConntrackGCStartingInterval
GC_MIN_INTERVAL = 10.0        # defaults.ConntrackGCMinInterval
GC_MAX_INTERVAL = 12 * 3600.0  # defaults.ConntrackGCMaxLRUInterval


def next_interval(previous: float, delete_ratio: float, *, maximum: float = GC_MAX_INTERVAL) -> float:
    """Cilium's calculateInterval: shorter when a pass freed much of a table, longer when it freed little."""
    if delete_ratio == 0.0:  # nothing to learn from (Cilium keeps the interval)
        return previous
    if delete_ratio > 0.25:
        return max(GC_MIN_INTERVAL, round(previous * (1.0 - min(delete_ratio, 0.9))))
    if delete_ratio < 0.05:
        return min(maximum, round(previous * 1.5))
    return previous


class ConntrackGC:
    """Runs GC passes over a node's conntrack maps; `run()` is the scheduled loop."""

    def __init__(self, dp: Datapath, registry: prometheus_client.CollectorRegistry | None, *,
                 interval: float = 0.0, max_interval: float = GC_MAX_INTERVAL) -> None:
        self.dp = dp
        self.fixed = interval > 0
        self.interval = interval if self.fixed else min(GC_STARTING_INTERVAL, max_interval)
        self.max_interval = max_interval
        self.runs = 0
        self.last: list[GcResult] = []
        self.last_run = 0.0
        self._wake = asyncio.Event()
        self.entries = prometheus_client.Gauge(
            "cilium_datapath_conntrack_gc_entries", "Entries alive and deleted by the last conntrack GC pass",
            ["family", "protocol", "status"], registry=registry)
        self.deleted_total = prometheus_client.Counter(
            "propolis_conntrack_gc_deleted_entries", "Conntrack entries collected by GC",
            ["family", "protocol"], registry=registry)
        self.duration = prometheus_client.Gauge(
            "cilium_datapath_conntrack_gc_duration_seconds", "Duration of the last conntrack GC pass",
            registry=registry)

    def run_once(self) -> list[GcResult]:
        """One pass (blocking syscalls: call in a thread); adapts the interval unless it is fixed."""
        started = time.perf_counter()
        results = self.dp.ct_gc_report()
        self.duration.set(time.perf_counter() - started)
        for r in results:
            self.entries.labels("ipv4", r.protocol, "alive").set(r.alive)
            self.entries.labels("ipv4", r.protocol, "deleted").set(r.deleted)
            self.deleted_total.labels("ipv4", r.protocol).inc(r.deleted)
        ratio = max((r.deleted / r.max_entries for r in results if r.max_entries), default=0.0)
        if not self.fixed:
            self.interval = next_interval(self.interval, ratio, maximum=self.max_interval)
        self.runs += 1
        self.last, self.last_run = results, time.time()
        return results

    def trigger(self) -> None:
        """Run a pass now (e.g. the table is filling up)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            results = await asyncio.to_thread(self.run_once)
            deleted = sum(r.deleted for r in results)
            if deleted:
                log.info("conntrack GC deleted %d expired entries; next pass in %.0fs", deleted, self.interval)

    def status(self) -> dict[str, object]:
        return {"interval_seconds": self.interval, "runs": self.runs, "adaptive": not self.fixed,
                "last": {r.map_name: {"deleted": r.deleted, "alive": r.alive, "max_entries": r.max_entries}
                         for r in self.last}}
