"""The sandbox's NATS cluster (`sandbox/nats_cluster.py`) with real nats-servers, no sandbox around it:
3 servers form a JetStream cluster, buckets get 3 replicas, a `Bus` given every URL (comma-separated)
fails over when the server it talks to dies, and a server restarted on its port and store catches up."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from propolis.bus import subjects
from propolis.bus.connection import Bus
from propolis.errors import ValidationError
from propolis_sandbox.config import SandboxConfig
from propolis_sandbox.nats_cluster import NatsServers


async def until_true(what: str, check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await check():
                return
        except Exception:  # noqa: BLE001 - the cluster settles (elections): ask again
            pass
        assert time.monotonic() < deadline, f"{what} not within {timeout}s"
        await asyncio.sleep(0.2)


async def test_a_cluster_replicates_fails_over_and_takes_a_restarted_server_back(tmp_path: Path) -> None:
    servers = NatsServers(tmp_path / "nats", replicas=3, config_text="", cluster_name="t", log_dir=tmp_path)
    url = await servers.start()
    assert url.count(",") == 2 and sorted(p.name for p in tmp_path.glob("nats-server-*.log")) == \
        ["nats-server-1.log", "nats-server-2.log", "nats-server-3.log"]
    bus = Bus(url, name="test", reconnect_wait=0.1)
    try:
        await bus.connect(max_wait=10)

        async def buckets_created() -> bool:
            await bus.ensure_buckets(replicas=3)
            return True
        await until_true("the buckets (the cluster electing its meta leader)", buckets_created)
        stream = f"KV_{subjects.K8S_BUCKET}"
        assert (await bus.js.stream_info(stream)).config.num_replicas == 3
        kv = await bus.kv(subjects.K8S_BUCKET)
        await kv.store.put("before", b"1")

        connected = next(s for s in servers.servers if s.url.endswith(f":{bus.nc.connected_url.port}"))
        killed_pid = connected.proc.pid if connected.proc else 0
        os.kill(killed_pid, signal.SIGKILL)
        await asyncio.to_thread(connected.proc.wait)  # type: ignore[union-attr]
        assert servers.dead() == [connected]

        async def put_after_failover() -> bool:
            await kv.store.put("after", b"2")
            return True
        await until_true("a put through another server", put_after_failover)
        assert bus.nc.connected_url.port != int(connected.url.rsplit(":", 1)[1])

        url_before = connected.url
        await asyncio.to_thread(connected.restart_sync)
        assert connected.url == url_before and connected.proc is not None and connected.proc.pid != killed_pid

        async def current_everywhere() -> bool:
            group = (await bus.js.stream_info(stream)).cluster
            return group is not None and all(p.current and not p.offline for p in group.replicas or []) \
                and len(group.replicas or []) == 2
        await until_true("the restarted server current again", current_everywhere)
        assert (await kv.store.get("before")).value == b"1" and (await kv.store.get("after")).value == b"2"
    finally:
        await bus.close()
        await servers.stop()


def test_replica_counts_other_than_a_quorum_size_are_refused() -> None:
    with pytest.raises(ValidationError, match="nats_replicas"):
        SandboxConfig(name="t", nats_replicas=2)
    with pytest.raises(ValueError, match="replicas"):
        NatsServers(Path("/nonexistent"), replicas=2, config_text="", cluster_name="t", log_dir=Path("/nonexistent"))
