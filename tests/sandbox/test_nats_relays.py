"""The sandbox's relay tier (`sandbox/nats_relays.py`) with real nats-servers, no sandbox around it: relays of
a 3-server hub mirror every bucket, nodes are spread over them round-robin, and a relay's watch goes on while
the hub loses the bucket's stream leader (the leafnode fails over to another hub server and the mirror
resumes on nats-server's retry; never made anew, since a watch re-syncing from an empty mirror would prune)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from test_nats_cluster_failover import until_true

from propolis.bus import permissions, relay, subjects
from propolis.bus.connection import Bus
from propolis.bus.kv import EventType
from propolis.bus.messages import Watermark
from propolis.errors import ValidationError
from propolis_sandbox.config import SandboxConfig
from propolis_sandbox.nats_cluster import NatsServers
from propolis_sandbox.nats_relays import NatsRelays

WRITER = "k8s-watcher"


async def test_relays_of_a_hub_cluster_mirror_and_survive_losing_a_hub_server(tmp_path: Path) -> None:
    admin, users = permissions.generate_credentials([WRITER])
    relays = NatsRelays(tmp_path / "nats", count=2, users=users, admin=admin, log_dir=tmp_path, hub_servers=3)
    hub = NatsServers(tmp_path / "nats", replicas=3, config_text=permissions.server_config(users, admin=admin),
                      cluster_name="t", log_dir=tmp_path, domain=relay.HUB_DOMAIN, server_config=relays.hub_config)
    buses: list[Bus] = []
    supervise: asyncio.Task[None] | None = None
    try:
        hub_admin = Bus(await hub.start(), name="hub-admin", user=admin.user, password=admin.password,
                        reconnect_wait=0.1)
        buses.append(hub_admin)
        await hub_admin.connect(max_wait=10)

        async def buckets_created() -> bool:
            await hub_admin.ensure_buckets(replicas=3)
            return True
        await until_true("the buckets (the cluster electing its meta leader)", buckets_created)
        await relays.start()
        supervise = asyncio.create_task(relays.supervise(), name="test-relays-supervise")  # as the supervisor does
        assert [relays.for_node(n) for n in (1, 2, 3)] == [relays.servers[0], relays.servers[1], relays.servers[0]]
        assert sorted(p.name for p in tmp_path.glob("nats-relay-*.log")) == ["nats-relay-1.log", "nats-relay-2.log"]

        service = Bus(relays.for_node(2).url, name=WRITER, user=WRITER, password=users[WRITER].password)
        buses.append(service)
        await service.connect(max_wait=10)
        relay_kv = await service.kv(subjects.K8S_BUCKET)
        seen: dict[str, object] = {}
        synced = asyncio.Event()

        async def follow() -> None:
            async for ev in relay_kv.watch():
                if ev.type is EventType.SYNCED:
                    synced.set()
                elif ev.type is EventType.PUT:
                    seen[ev.key] = ev.value
        task = asyncio.create_task(follow(), name="test-relay-watch")
        try:
            await asyncio.wait_for(synced.wait(), 10)
            await relay_kv.put("pods.ns.before", Watermark(1, 0.0))  # through the relay, into the hub's cluster
            hub_kv = await hub_admin.kv(subjects.K8S_BUCKET)
            assert (await hub_kv.get("pods.ns.before")) is not None

            # lose the bucket's stream leader: it serves the relays' mirror consumers
            leader = (await hub_admin.js.stream_info(f"KV_{subjects.K8S_BUCKET}")).cluster.leader  # type: ignore[union-attr]
            victim = hub.servers[int(str(leader).rsplit("-", 1)[1]) - 1]
            os.kill(victim.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
            await asyncio.to_thread(victim.proc.wait)  # type: ignore[union-attr]
            lost_at = time.monotonic()

            async def put_at_hub() -> bool:
                await hub_kv.put("pods.ns.after", Watermark(2, 0.0))
                return True
            await until_true("a put at the hub after losing a server", put_at_hub)

            async def delivered() -> bool:
                return seen.get("pods.ns.after") == Watermark(2, 0.0)
            # nats-server's mirror retry after losing the server holding the mirror's consumer: 10-40 s measured
            await until_true("the put delivered through the relay", delivered, timeout=90)
            print(f"delivered through the relay {time.monotonic() - lost_at:.1f}s after losing the stream leader {leader}")
            assert seen["pods.ns.before"] == Watermark(1, 0.0)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        if supervise is not None:
            supervise.cancel()
            await asyncio.gather(supervise, return_exceptions=True)
        for bus in buses:
            await bus.close(timeout=0.5)
        await relays.stop()
        await hub.stop()


def test_more_relays_than_nodes_are_refused() -> None:
    with pytest.raises(ValidationError, match="nats_relays"):
        SandboxConfig(name="t", nodes=2, nats_relays=3)
    assert SandboxConfig(name="t", nodes=2, nats_relays=2, nats_replicas=3).nats_relays == 2
