"""A relay (a leafnode holding mirrors of the hub's buckets) serves watches, snapshots and writes like the
hub does, across restarts of either side (two real nats-servers on loopback: `bus/relay.py`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from propolis.bus import permissions, relay, subjects
from propolis.bus.connection import Bus
from propolis.bus.embedded import EmbeddedNats
from propolis.bus.kv import EventType, Kv, KvEvent
from propolis.bus.messages import Watermark
from propolis.errors import PermanentError, TemporaryError
from propolis_sandbox.nats_cluster import free_loopback_ports

BUCKET = subjects.K8S_BUCKET
WRITER = "k8s-watcher"  # the owner of BUCKET: may write it, and only it (besides its heartbeat)


@dataclass
class HubAndRelay:
    hub: EmbeddedNats
    relay: EmbeddedNats
    hub_admin: Bus
    relay_admin: Bus
    writer: permissions.Credentials


async def _connect(url: str, creds: permissions.Credentials, name: str) -> Bus:
    bus = Bus(url, name=name, user=creds.user, password=creds.password)
    await bus.connect(max_wait=5)
    return bus


@pytest.fixture
async def hub_and_relay(tmp_path: Path) -> AsyncIterator[HubAndRelay]:
    admin, users = permissions.generate_credentials([WRITER])
    leaf = permissions.Credentials(relay.LEAFNODE_USER, "leaf-secret")
    (leafnode_port,) = free_loopback_ports(1)
    hub = EmbeddedNats(tmp_path / "hub", config_text=permissions.server_config(users, admin=admin)
                       + relay.jetstream_config(relay.HUB_DOMAIN)
                       + relay.hub_leafnode_config(f"127.0.0.1:{leafnode_port}", leaf))
    relay_server = EmbeddedNats(tmp_path / "relay", config_text=relay.relay_config(
        users, admin=admin, hub_leafnodes=[f"127.0.0.1:{leafnode_port}"], leaf=leaf)
        + relay.jetstream_config(relay.relay_domain(1)))
    buses: list[Bus] = []
    try:
        await hub.start()
        await relay_server.start()
        hub_admin = await _connect(hub.url, admin, "hub-admin")
        buses.append(hub_admin)
        await hub_admin.ensure_buckets()
        relay_admin = await _connect(relay_server.url, admin, "relay-admin")
        buses.append(relay_admin)
        await _until(lambda: _mirrors_ensured(relay_admin), "the relay's mirrors")
        yield HubAndRelay(hub, relay_server, hub_admin, relay_admin, users[WRITER])
    finally:
        for b in buses:
            await b.close()
        await relay_server.stop()
        await hub.stop()


async def _mirrors_ensured(bus: Bus) -> bool:
    try:
        await relay.ensure_mirrors(bus)
    except TemporaryError:  # the leafnode is not up yet
        return False
    return True


async def _until(check, what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.05)


class Follower:
    """A watch on a bucket, its events kept in order."""

    def __init__(self, kv: Kv) -> None:
        self.events: list[KvEvent] = []
        self.synced = asyncio.Event()
        self.task = asyncio.create_task(self._run(kv), name="test-relay-watch")

    async def _run(self, kv: Kv) -> None:
        async for ev in kv.watch():
            self.events.append(ev)
            if ev.type is EventType.SYNCED:
                self.synced.set()

    async def value(self, key: str, timeout: float = 10.0) -> object:
        async def seen() -> bool:
            return any(e.key == key for e in self.events)
        await _until(seen, f"watch event for {key}", timeout)
        return [e for e in self.events if e.key == key][-1].value

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_relay_mirrors_serve_watch_snapshot_and_writes(hub_and_relay: HubAndRelay, tmp_path: Path) -> None:
    env = hub_and_relay
    assert await relay.ensure_mirrors(env.relay_admin) == [], "a second ensure changes nothing"
    ready = tmp_path / "ready"
    keeper = asyncio.create_task(relay.run_mirrors(env.relay_admin, 0.1, ready_file=ready), name="test-mirrors")

    async def is_ready() -> bool:
        return ready.exists()
    await _until(is_ready, "the relay-mirrors ready file")
    keeper.cancel()
    await asyncio.gather(keeper, return_exceptions=True)
    hub_kv = await env.hub_admin.kv(BUCKET)
    service = await _connect(env.relay.url, env.writer, WRITER)
    try:
        relay_kv = await service.kv(BUCKET)
        follower = Follower(relay_kv)
        await asyncio.wait_for(follower.synced.wait(), 5)

        await hub_kv.put("pods.ns.a", Watermark(1, 0.0))  # written at the hub: seen through the relay
        assert await follower.value("pods.ns.a") == Watermark(1, 0.0)
        assert (await relay_kv.items())["pods.ns.a"].value == Watermark(1, 0.0)
        assert (await relay_kv.get("pods.ns.a")) is not None

        revision = await relay_kv.put("pods.ns.b", Watermark(2, 0.0))  # written at the relay: lands in the hub
        hub_entry = await hub_kv.get("pods.ns.b")
        assert hub_entry is not None and hub_entry.value == Watermark(2, 0.0) and hub_entry.revision == revision
        assert await follower.value("pods.ns.b") == Watermark(2, 0.0)
        await relay_kv.delete("pods.ns.b")
        await _until(lambda: _absent(hub_kv, "pods.ns.b"), "delete through the relay")

        # the relay checks the writer's own permissions: another owner's bucket stays closed
        with pytest.raises(Exception, match="[Tt]imeout"):
            await service.nc.request(f"$KV.{subjects.IDENTITIES_BUCKET}.x", b"{}", timeout=0.5)
        assert any("permissions violation" in e for e in service.errors)
        await follower.stop()
    finally:
        await service.close()


async def _put_retrying(kv: Kv, key: str, value: object, timeout: float = 10.0) -> None:
    """A put while the writer's connection comes back after a server restart."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await kv.put(key, value)
            return
        except TemporaryError:
            assert asyncio.get_running_loop().time() < deadline, f"put {key}: NATS not back within {timeout}s"
            await asyncio.sleep(0.1)


async def _absent(kv: Kv, key: str) -> bool:
    return await kv.get(key) is None


async def test_relay_never_creates_a_bucket_of_its_own(hub_and_relay: HubAndRelay) -> None:
    env = hub_and_relay
    await (await env.hub_admin.kv(BUCKET)).put("pods.ns.a", Watermark(1, 0.0))
    await env.relay_admin.js.delete_stream(f"KV_{BUCKET}")
    assert await relay.mirrors_behind(env.relay_admin) == [BUCKET]
    with pytest.raises(TemporaryError, match="does not exist yet"):
        await env.relay_admin.kv(BUCKET)
    with pytest.raises(PermanentError, match="relay 'relay-1'"):
        await env.relay_admin.kv(BUCKET, create=True)
    assert await relay.ensure_mirrors(env.relay_admin) == [BUCKET]

    async def caught_up() -> bool:
        return await relay.mirrors_behind(env.relay_admin) == []
    await _until(caught_up, "the re-made mirror caught up with the hub")
    with pytest.raises(PermanentError, match="not a relay"):
        await relay.ensure_mirrors(env.hub_admin)


async def test_relay_watch_survives_restarts_of_relay_and_hub(hub_and_relay: HubAndRelay) -> None:
    env = hub_and_relay
    hub_kv = await env.hub_admin.kv(BUCKET)
    service = await _connect(env.relay.url, env.writer, WRITER)
    try:
        follower = Follower(await service.kv(BUCKET))
        await asyncio.wait_for(follower.synced.wait(), 5)

        await env.relay.stop()  # the relay's store keeps its mirrors; its consumers are gone
        await hub_kv.put("pods.ns.while-relay-down", Watermark(3, 0.0))
        await env.relay.start()
        assert await follower.value("pods.ns.while-relay-down", timeout=15) == Watermark(3, 0.0)
        await hub_kv.put("pods.ns.after-relay-restart", Watermark(4, 0.0))
        assert await follower.value("pods.ns.after-relay-restart", timeout=15) == Watermark(4, 0.0)

        # The relay's consumers stay; its mirror resumes once nats-server's mirror retry finds the hub's stream
        # again (its back-off: 10-25 s measured on 2.15), and the watch delivers what it missed.
        await env.hub.stop()
        await env.hub.start()
        await _put_retrying(hub_kv, "pods.ns.after-hub-restart", Watermark(5, 0.0))
        assert await follower.value("pods.ns.after-hub-restart", timeout=60) == Watermark(5, 0.0)
        assert not [e for e in follower.events if e.type is EventType.DELETE], "no key lost on the way"
        await follower.stop()
    finally:
        await service.close()
