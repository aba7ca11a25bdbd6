"""The bus against a real nats-server: pub/sub, KV watch contract, reconnects, permissions."""

from __future__ import annotations

import asyncio

import msgpack
import nats
import pytest

from propolis.bus import permissions, subjects
from propolis.bus.connection import Bus
from propolis.bus.embedded import EmbeddedNats
from propolis.bus.kv import Conflict, EventType
from propolis.bus.messages import Event, Heartbeat
from propolis.errors import TemporaryError


def _event(msg: str) -> Event:
    return Event(kind="Test", object="o", message=msg, service="t", node="n", time=0.0)


async def _collect(aiter, n: int, timeout: float = 5.0):
    out = []

    async def run():
        async for ev in aiter:
            out.append(ev)
            if len(out) >= n:
                return

    await asyncio.wait_for(run(), timeout)
    return out


async def test_publish_subscribe_round_trip_and_bad_payload_is_dropped(bus: Bus):
    got: asyncio.Queue = asyncio.Queue()

    async def handler(obj, msg):
        await got.put(obj)

    await bus.subscribe("propolis.v1.events.>", handler, expected=Event)
    await bus.nc.publish("propolis.v1.events.test", b"\xc1 not msgpack")
    await bus.nc.publish("propolis.v1.events.test", msgpack.packb(["event", 9, 0]))
    await bus.publish("propolis.v1.events.test", _event("hello"))
    first = await asyncio.wait_for(got.get(), 5)
    assert first.message == "hello"  # the two bad payloads never reached the handler
    assert got.empty()


async def test_kv_watch_gives_initial_values_then_synced_then_updates(bus: Bus):
    kv = await bus.kv(subjects.K8S_BUCKET)
    await kv.put("pods.a.one", _event("1"))
    await kv.put("pods.a.two", _event("2"))
    await kv.put("nodes._.n1", _event("node"))
    watch = kv.watch("pods.>")
    initial = await _collect(watch, 3)
    assert [e.type for e in initial] == [EventType.PUT, EventType.PUT, EventType.SYNCED]
    assert {e.key for e in initial[:2]} == {"pods.a.one", "pods.a.two"}
    await kv.delete("pods.a.one")
    await kv.put("pods.a.three", _event("3"))
    later = await _collect(watch, 2)
    assert (later[0].type, later[0].key) == (EventType.DELETE, "pods.a.one")
    assert (later[1].type, later[1].key, later[1].value.message) == (EventType.PUT, "pods.a.three", "3")
    await watch.aclose()


async def test_kv_watch_replays_to_a_restarted_consumer(bus: Bus):
    kv = await bus.kv(subjects.IDENTITIES_BUCKET)
    for i in range(5):
        await kv.put(f"id.{i}", _event(str(i)))
    await kv.put("id.1", _event("1b"))
    await kv.delete("id.4")
    state = await kv.items("id.>")
    assert {k: e.value.message for k, e in state.items()} == {"id.0": "0", "id.1": "1b", "id.2": "2", "id.3": "3"}
    # a new consumer (a restarted service) sees the same latest state
    again = await kv.items("id.>")
    assert {k: e.revision for k, e in again.items()} == {k: e.revision for k, e in state.items()}


async def test_kv_compare_and_set(bus: Bus):
    kv = await bus.kv(subjects.IDENTITIES_BUCKET)
    rev = await kv.create("labels.x", _event("a"))
    with pytest.raises(Conflict):
        await kv.create("labels.x", _event("b"))
    rev2 = await kv.update("labels.x", _event("c"), rev)
    with pytest.raises(Conflict):
        await kv.update("labels.x", _event("d"), rev)
    assert (await kv.get("labels.x")).revision == rev2
    await kv.delete("labels.x")
    await kv.delete("labels.x")  # missing is success
    assert await kv.get("labels.x") is None


async def test_watch_converges_after_server_restart(nats_server: EmbeddedNats):
    """State written while a watcher was cut off (puts and deletes) reaches it after reconnect."""
    b = Bus(nats_server.url, name="watcher")
    await b.connect(max_wait=5)
    await b.ensure_buckets()
    writer = Bus(nats_server.url, name="writer")
    await writer.connect(max_wait=5)
    try:
        kv = await b.kv(subjects.K8S_BUCKET)
        wkv = await writer.kv(subjects.K8S_BUCKET)
        await wkv.put("pods.a.keep", _event("keep"))
        await wkv.put("pods.a.gone", _event("gone"))
        seen: dict[str, str] = {}
        synced = asyncio.Event()
        resynced = asyncio.Event()

        async def follow():
            count = 0
            async for ev in kv.watch("pods.>"):
                if ev.type is EventType.SYNCED:
                    count += 1
                    (synced if count == 1 else resynced).set()
                elif ev.type is EventType.PUT:
                    seen[ev.key] = ev.value.message
                else:
                    seen.pop(ev.key, None)

        task = asyncio.create_task(follow())
        await asyncio.wait_for(synced.wait(), 5)
        assert seen == {"pods.a.keep": "keep", "pods.a.gone": "gone"}

        await asyncio.to_thread(nats_server.restart_sync)  # same port, same JetStream store
        # the writer reconnects and changes state; the watcher must catch up on all of it
        for _ in range(100):
            try:
                await wkv.delete("pods.a.gone")
                await wkv.put("pods.a.new", _event("new"))
                break
            except (TimeoutError, nats.errors.Error, TemporaryError):
                await asyncio.sleep(0.1)
        await asyncio.wait_for(resynced.wait(), 15)
        for _ in range(50):
            if seen == {"pods.a.keep": "keep", "pods.a.new": "new"}:
                break
            await asyncio.sleep(0.1)
        assert seen == {"pods.a.keep": "keep", "pods.a.new": "new"}
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await writer.close()
        await b.close()


async def test_permissions_confine_each_service_to_its_slice(tmp_path):
    admin, users = permissions.generate_credentials(["k8s-watcher", "identity-allocator", "hubble"])
    conf = permissions.server_config(users, admin=admin)
    async with EmbeddedNats(tmp_path / "nats", config_text=conf) as server:
        adm = Bus(server.url, name="admin", user=admin.user, password=admin.password)
        await adm.connect(max_wait=5)
        await adm.ensure_buckets()
        hub = Bus(server.url, name="hubble", user="hubble", password=users["hubble"].password)
        watcher = Bus(server.url, name="w", user="k8s-watcher", password=users["k8s-watcher"].password)
        await hub.connect(max_wait=5)
        await watcher.connect(max_wait=5)
        try:
            # the owner writes its slice; others can read it
            wkv = await watcher.kv(subjects.K8S_BUCKET)
            await wkv.put("pods.a.x", _event("mine"))
            hkv = await hub.kv(subjects.K8S_BUCKET)
            assert (await hkv.get("pods.a.x")).value.message == "mine"
            # hubble cannot write the k8s slice nor the identities slice
            for bucket in (subjects.K8S_BUCKET, subjects.IDENTITIES_BUCKET):
                foreign = await hub.kv(bucket)
                with pytest.raises((nats.errors.Error, asyncio.TimeoutError)):
                    await asyncio.wait_for(foreign.put("pods.a.x", _event("forged")), 3)
            assert (await hkv.get("pods.a.x")).value.message == "mine"
            # nor delete a stream
            with pytest.raises((nats.errors.Error, asyncio.TimeoutError)):
                await asyncio.wait_for(hub.js.delete_key_value(subjects.K8S_BUCKET), 3)
            # a plain subject outside its slice is refused by the server
            errors_before = len(hub.errors)
            await hub.nc.publish("propolis.v1.events.policy", b"x")
            await hub.nc.flush()
            for _ in range(50):
                if len(hub.errors) > errors_before:
                    break
                await asyncio.sleep(0.05)
            assert any("permissions violation" in e.lower() and "events.policy" in e for e in hub.errors[errors_before:])
            # its own flows subject is fine, and so is its heartbeat
            await hub.publish(subjects.heartbeat_subject("hubble", "n1"), Heartbeat(
                service="hubble", node="n1", instance="i", version="v", pid=1, started_at=0, sent_at=0, health="ok"))
        finally:
            for b in (hub, watcher, adm):
                await b.close()
