"""A KV watch's lifetime against a real nats-server: it leaves no listener behind when it ends, its
starts are capped per process, and a reconnect to a server that kept its consumer misses nothing
without re-syncing the whole bucket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from propolis.bus import kv as kv_mod
from propolis.bus import subjects
from propolis.bus.connection import Bus
from propolis.bus.embedded import EmbeddedNats
from propolis.bus.kv import EventType, KvEvent
from propolis.bus.messages import Watermark


@pytest.fixture
def no_start_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start watches at once: these tests start hundreds in a row."""
    monkeypatch.setattr(kv_mod, "WATCH_START_JITTER_S", 0.0)
    monkeypatch.setattr(kv_mod, "WATCH_RESYNC_JITTER_S", 0.0)


async def test_watching_many_times_leaves_no_reconnect_listeners(bus: Bus, no_start_jitter: None) -> None:
    kv = await bus.kv(subjects.K8S_BUCKET)
    await kv.put("pods.ns.a", Watermark(1, 0.0))
    before = bus.reconnect_listeners
    for _ in range(200):
        events = [ev async for ev in kv.watch(">", follow=False)]  # runs to its end: SYNCED, then returns
        assert [e.type for e in events] == [EventType.PUT, EventType.SYNCED]
        await kv.items()
    for _ in range(50):  # abandoned mid-way (a consumer that stops reading): closing it removes its listener
        watch = kv.watch(">")
        assert (await anext(watch)).key == "pods.ns.a"
        assert bus.reconnect_listeners == before + 1
        await watch.aclose()
    assert bus.reconnect_listeners == before


async def test_watch_starts_are_capped_per_process(bus: Bus, no_start_jitter: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Many watches starting at once (a service's start, a re-sync after a server restart) create at most
    `MAX_CONCURRENT_WATCH_STARTS` consumers at a time, and all of them sync."""
    kv = await bus.kv(subjects.K8S_BUCKET)
    await kv.put("pods.ns.a", Watermark(1, 0.0))
    in_flight = peak = 0
    real_stream_created = kv_mod.Kv._stream_created

    async def counting(self: kv_mod.Kv) -> object:  # observes the real call, changes nothing
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.01)  # hold the slot a little, so that starts overlap
            return await real_stream_created(self)
        finally:
            in_flight -= 1

    monkeypatch.setattr(kv_mod.Kv, "_stream_created", counting)

    async def sync_once() -> list[KvEvent]:
        return [ev async for ev in kv.watch(">", follow=False)]

    results = await asyncio.gather(*(sync_once() for _ in range(20)))
    assert all([e.type for e in r] == [EventType.PUT, EventType.SYNCED] for r in results)
    assert peak == kv_mod.MAX_CONCURRENT_WATCH_STARTS


class _Relay:
    """A TCP relay on loopback between the client and nats-server: cutting it makes the client reconnect
    while the server (and the watch's consumer on it) keeps running."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        """Drop every relayed connection (new ones are accepted again)."""
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def relayed_bus(nats_server: EmbeddedNats) -> AsyncIterator[tuple[Bus, _Relay]]:
    relay = _Relay(int(nats_server.url.rsplit(":", 1)[1]))
    await relay.start()
    b = Bus(f"nats://127.0.0.1:{relay.port}", name="relayed", reconnect_wait=0.1)
    await b.connect(max_wait=5)
    await b.ensure_buckets()
    try:
        yield b, relay
    finally:
        await b.close()
        await relay.close()


@pytest.mark.parametrize("keys", ["pods.>", ["pods.>", subjects.WATERMARK_KEY]], ids=["one-filter", "filters"])
async def test_a_reconnect_keeps_the_watch_consumer_and_misses_nothing(
        relayed_bus: tuple[Bus, _Relay], nats_server: EmbeddedNats, no_start_jitter: None,
        keys: str | list[str]) -> None:
    bus, relay = relayed_bus
    writer = Bus(nats_server.url, name="writer")
    await writer.connect(max_wait=5)
    try:
        kv = await bus.kv(subjects.K8S_BUCKET)
        wkv = await writer.kv(subjects.K8S_BUCKET)
        await wkv.put("pods.ns.keep", Watermark(1, 0.0))
        await wkv.put("pods.ns.gone", Watermark(2, 0.0))
        events: list[KvEvent] = []
        seen: dict[str, int] = {}
        synced = asyncio.Event()

        async def follow() -> None:
            async for ev in kv.watch(keys):
                events.append(ev)
                if ev.type is EventType.SYNCED:
                    synced.set()
                elif ev.type is EventType.PUT:
                    seen[ev.key] = ev.value.resource_version
                else:
                    seen.pop(ev.key, None)

        task = asyncio.create_task(follow(), name="test-follow")
        await asyncio.wait_for(synced.wait(), 5)
        consumers = (await writer.jetstream_info()).consumers
        reconnects = bus.reconnects
        relay.cut()
        await wkv.delete("pods.ns.gone")  # while the watcher is cut off
        await wkv.put("pods.ns.new", Watermark(3, 0.0))
        for _ in range(100):
            if bus.reconnects > reconnects:
                break
            await asyncio.sleep(0.05)
        assert bus.reconnects > reconnects, "the client did not reconnect through the relay"
        for _ in range(300):  # nats-py resumes its ordered consumer within its heartbeat interval (5 s)
            if seen == {"pods.ns.keep": 1, "pods.ns.new": 3}:
                break
            await asyncio.sleep(0.05)
        assert seen == {"pods.ns.keep": 1, "pods.ns.new": 3}
        assert [e.type for e in events].count(EventType.SYNCED) == 1, "re-synced the whole bucket"
        # nats-py restarted its ordered consumer after the last sequence it had (the one it lost messages on
        # lingers until the server's inactivity threshold): one consumer more, not a re-sync of the bucket
        assert (await writer.jetstream_info()).consumers <= consumers + 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await writer.close()
