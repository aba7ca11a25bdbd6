"""Kernel-side figures of `propolis bench policy` (issue 5): per-packet cost of bpf_lxc through
BPF_PROG_TEST_RUN (item 3) and policy-map reconcile time (item 1, `measure_map_reconcile`).

Why here: the measurement needs the datapath's own maps and packet builders; the bench
command only formats. It loads a throw-away node (unique pin dir, removed afterwards),
seeds N ipcache rows and N policy rows for one endpoint, and times two paths with the
kernel's own repeat loop: an established flow (conntrack hit, no policy lookup) and a
new connection that policy denies (ipcache + two policy LPM lookups every time).
"""

from __future__ import annotations

import ipaddress
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

from propolis.datapath import packets as pk
from propolis.datapath.datapath import Datapath, DatapathSettings
from propolis.datapath.entries import IPCacheEntry, PolicyEntry
from propolis.maps import bpf
from propolis.maps.policy import PolicyEntryLike
from propolis.model.types import NumericIdentity
from propolis_sandbox.bench.common import percentile

_POD = "10.200.0.10"
_PEER = "10.201.0.1"
_ENDPOINT = 1


async def measure_packet_cost(sizes: tuple[int, ...] = (0, 10_000), repeat: int = 100_000,
                             rounds: int = 1) -> list[dict[str, Any]]:
    """ns/packet for each map size, side by side in one run; with ``rounds`` > 1 the kernel loop
    runs that many times and the figures are the p50 (p99 beside them)."""
    dp = Datapath(f"bench-{os.getpid()}-{uuid.uuid4().hex[:6]}",
                  settings=DatapathSettings(monitor_aggregation="maximum"))
    results: list[dict[str, Any]] = []
    try:
        await dp.load()
        assert dp.programs is not None
        net = ipaddress.ip_network("10.128.0.0/9")
        for size in sizes:
            dp.upsert_endpoint(endpoint_id=_ENDPOINT, ip=_POD, identity=1000, ifindex=1,
                               ingress_enforced=True, egress_enforced=False)
            cache = [IPCacheEntry(str(net.network_address + i * 4) + "/30", NumericIdentity(100_000 + i))
                     for i in range(size)]
            dp.set_ipcache([*cache, IPCacheEntry(_PEER, NumericIdentity(99))])
            dp.set_policy(_ENDPOINT, [PolicyEntry("ingress", identity=100_000 + i, protocol=6, port=80 + i % 1000)
                                      for i in range(size)] + [PolicyEntry("ingress", identity=99, protocol=6, port=443)])
            allowed = pk.tcp(_PEER, 40000, _POD, 443)
            bpf.prog_test_run(dp.programs.to_container_fd, allowed)  # creates the CT entry
            established, denied = [], []
            for _ in range(max(1, rounds)):
                established.append(bpf.prog_test_run(dp.programs.to_container_fd,
                                                     pk.tcp(_PEER, 40000, _POD, 443, pk.TCP_ACK), repeat=repeat)[1])
                denied.append(bpf.prog_test_run(dp.programs.to_container_fd,
                                                pk.tcp(_PEER, 40001, _POD, 444), repeat=repeat)[1])
            results.append({"policy_rows": size + 1, "ipcache_rows": size + 1, "repeat": repeat,
                            "rounds": len(established),
                            "established_ns_per_packet": percentile(established, 50),
                            "new_denied_ns_per_packet": percentile(denied, 50),
                            "established_ns_p99": percentile(established, 99),
                            "new_denied_ns_p99": percentile(denied, 99)})
            dp.set_policy(_ENDPOINT, [])
            dp.set_ipcache([])
    finally:
        await dp.remove_all()
    return results


async def measure_map_reconcile(full: dict[int, Sequence[PolicyEntryLike]],
                                changes: Sequence[dict[int, Sequence[PolicyEntryLike]]],
                                rounds: int = 1) -> dict[str, Any]:
    """Part 1's kernel half: the compiler's entries reconciled into real per-endpoint policy maps.

    `full` = endpoint -> entries after the full compute; `changes` = the same after each
    incremental change. Like the datapath-writer's reconciler, only endpoints whose entries
    changed are written (set_policy diffs each one). A throw-away node (unique pin dir,
    removed afterwards) holds the maps; map creation (one RCU grace period each when put in
    cilium_ep_to_policy) is timed apart from the row writes (``rounds`` times into empty maps).
    """
    dp = Datapath(f"bench-{os.getpid()}-{uuid.uuid4().hex[:6]}",
                  settings=DatapathSettings(monitor_aggregation="maximum"))
    ids = {identity: n + 1 for n, identity in enumerate(full)}  # identity -> endpoint id 1..N
    try:
        await dp.load()
        started = time.perf_counter()
        await dp.prepare_endpoints(ids.values())
        create = time.perf_counter() - started
        writes: list[float] = []
        for _ in range(max(1, rounds)):  # every round writes into empty maps
            for endpoint_id in ids.values():
                dp.set_policy(endpoint_id, [])
            rows = 0
            started = time.perf_counter()
            for identity, entries in full.items():
                rows += dp.set_policy(ids[identity], entries).added
            writes.append(time.perf_counter() - started)
        write = percentile(writes, 50)
        seconds: list[float] = []
        touched: list[int] = []
        previous = {identity: frozenset(entries) for identity, entries in full.items()}
        for change in changes:
            started = time.perf_counter()
            count = 0
            for identity, entries in change.items():
                if identity in ids and frozenset(entries) != previous[identity]:
                    dp.set_policy(ids[identity], entries)
                    previous[identity] = frozenset(entries)
                    count += 1
            seconds.append(time.perf_counter() - started)
            touched.append(count)
    finally:
        await dp.remove_all()
    return {"endpoints": len(ids), "rows": rows, "create_maps_seconds": round(create, 4),
            "write_rows_seconds": round(write, 4), "write_rounds": len(writes),
            "write_rows_p99_seconds": round(percentile(writes, 99), 4), "full_seconds": round(create + write, 4),
            "us_per_row": round(write / rows * 1e6, 2) if rows else None,
            "changes": len(seconds), "endpoints_touched_per_change": max(touched, default=0),
            "change_p50_ms": round(percentile(seconds, 50) * 1000, 3) if seconds else None,
            "change_p99_ms": round(percentile(seconds, 99) * 1000, 3) if seconds else None}
