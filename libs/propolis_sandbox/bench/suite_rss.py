"""Idle RSS of every service of the suite, measured where each really runs: a small real sandbox.

Why a sandbox: the node-scoped services (datapath-writer, hubble, l7-proxy, dns-proxy, wireguard-keymgr)
need a node — its netns, pinned maps, the datapath socket — and the datapath-writer and hubble load bcc,
the largest part of their memory. A 1-node sandbox with every service on (WireGuard and a cluster id, so
the optional ones run too) is up, caught up with the API and idle for ``settle`` seconds; each supervised
process's VmRSS is read from the pids in state.json; the sandbox goes down even when anything fails.
"""

from __future__ import annotations

import asyncio
from typing import Any

from propolis.suite import SUITE_SERVICES
from propolis_sandbox import cluster
from propolis_sandbox.bench.common import RSS_TARGET_MB, rss_mb
from propolis_sandbox.fixture import unique_name

#: how the rows were measured (the row says it; the docs quote it)
MEASURED = "1-node sandbox, every service (wireguard, cluster id 1), idle after wait"
WAIT_TIMEOUT_S = 120.0


async def sandbox_idle_rss(settle: float = 5.0, *, name: str | None = None) -> list[dict[str, Any]]:
    """One row per entry of SUITE_SERVICES: {service, scope, idle_rss_mb, target_mb, measured}; an entry the
    sandbox did not run (or whose process is gone) has NaN and says so. ``name``: the sandbox's (default unique)."""
    name = name or unique_name("rss")
    try:
        state = await asyncio.to_thread(cluster.up, name, nodes=1, services="all", encryption="wireguard",
                                        cluster_id=1)
        await cluster.wait(state, timeout=WAIT_TIMEOUT_S)
        await asyncio.sleep(settle)
        pids = {s["name"]: int(s["pid"]) for s in cluster.require_state(name).services}  # reread: restarts
        return [_row(s.name, s.scope, pids.get(s.name, 0)) for s in SUITE_SERVICES]
    finally:
        await asyncio.to_thread(cluster.down, name)


def _row(service: str, scope: str, pid: int) -> dict[str, Any]:
    try:
        rss = rss_mb(pid) if pid > 0 else float("nan")
        measured = MEASURED if pid > 0 else "not running in the sandbox"
    except FileNotFoundError:
        rss, measured = float("nan"), f"pid {pid} gone before it was read"
    return {"service": service, "scope": scope, "idle_rss_mb": round(rss, 1), "target_mb": RSS_TARGET_MB,
            "measured": measured}
