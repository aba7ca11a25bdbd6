"""`propolis bench bus`: the codec path against raw nats-py bytes, KV latencies, idle RSS of every service."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from propolis.bus import codec, subjects
from propolis.bus.connection import Bus
from propolis.bus.embedded import EmbeddedNats
from propolis.bus.kv import EventType, Kv
from propolis.bus.messages import BenchProbe, K8sObject
from propolis_sandbox.bench.common import idle_rss, percentile, print_table, report
from propolis_sandbox.bench.suite_rss import sandbox_idle_rss


def _probe(seq: int) -> BenchProbe:
    return BenchProbe(seq=seq, sent_ns=time.perf_counter_ns(), node="kind-worker", src="10.244.1.17",
                      dst="10.244.2.33", port=8080, verdict="FORWARDED")


async def _throughput(bus: Bus, n: int, encode: Callable[[int], bytes], decode: Callable[[bytes], Any]) -> float:
    subject = "bench.throughput"
    received = 0
    done = asyncio.Event()

    async def on_msg(msg: Any) -> None:
        nonlocal received
        decode(msg.data)
        received += 1
        if received == n:
            done.set()

    sub = await bus.nc.subscribe(subject, cb=on_msg, pending_msgs_limit=n + 1, pending_bytes_limit=-1)
    await bus.nc.flush()
    start = time.perf_counter()
    for i in range(n):
        await bus.nc.publish(subject, encode(i))
        if i % 1000 == 0:
            await asyncio.sleep(0)
    await bus.nc.flush()
    await asyncio.wait_for(done.wait(), 120)
    elapsed = time.perf_counter() - start
    await sub.unsubscribe()
    return n / elapsed


async def _latency(bus: Bus, n: int, encode: Callable[[int], bytes], decode: Callable[[bytes], Any]) -> list[float]:
    subject = "bench.latency"
    samples: list[float] = []
    got: asyncio.Queue[float] = asyncio.Queue()

    async def on_msg(msg: Any) -> None:
        decode(msg.data)
        got.put_nowait(time.perf_counter_ns())

    sub = await bus.nc.subscribe(subject, cb=on_msg)
    await bus.nc.flush()
    for i in range(n):
        t0 = time.perf_counter_ns()
        await bus.nc.publish(subject, encode(i))
        await bus.nc.flush()
        samples.append((await got.get() - t0) / 1e6)
    await sub.unsubscribe()
    return samples


async def _kv(bus: Bus, n: int) -> tuple[list[float], list[float]]:
    kv = await bus.kv(subjects.K8S_BUCKET)
    puts: list[float] = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        await kv.put(f"bench.put.{i % 100}", _probe(i))
        puts.append((time.perf_counter_ns() - t0) / 1e6)
    deliveries: list[float] = []
    watch = kv.watch("bench.watch.>")
    async for ev in watch:
        if ev.type is EventType.SYNCED:
            break
    for i in range(n):
        t0 = time.perf_counter_ns()
        await kv.put(f"bench.watch.{i % 100}", _probe(i))
        async for ev in watch:
            if ev.type is EventType.PUT and ev.value.seq == i:
                break
        deliveries.append((time.perf_counter_ns() - t0) / 1e6)
    await watch.aclose()
    return puts, deliveries


def _pod(i: int) -> K8sObject:
    """A mirrored pod about the size of the project's (~1.9 KB encoded)."""
    labels = {f"app.kubernetes.io/label-{j}": f"value-{i}-{j}-" + "x" * 40 for j in range(24)}
    return K8sObject("Pod", "bench", f"pod-{i}", f"uid-{i}", str(i), labels,
                     {"nodeName": f"kind-worker{i % 100}", "containers": [{"name": "app", "ports": []}]},
                     {"phase": "Running", "podIP": f"10.244.{i // 250 % 250}.{i % 250 + 1}"})


class _Round(NamedTuple):
    sync_s: float  # first initial value -> the last one (Kv.watch: -> SYNCED)
    first_s: float  # the call -> its first event (Kv.watch: includes its start-up jitter)
    follow_s: float  # the first of ``updates`` published -> the last one delivered


async def _publish_updates(writer: Bus, bucket: str, keys: int, updates: int) -> None:
    """``updates`` puts, pipelined (core publishes into the bucket's stream, no ack waited for)."""
    data = codec.encode(_pod(0))
    for i in range(updates):
        await writer.publish_raw(f"$KV.{bucket}.{subjects.k8s_key('pods', 'bench', f'pod-{i % keys}', node='n1')}", data)
    await writer.flush(30)


async def _round_kv_watch(kv: Kv, writer: Bus, flt: str, keys: int, updates: int) -> _Round:
    called = time.perf_counter()
    first = synced = 0.0
    n = 0
    watch = kv.watch(flt)
    async for ev in watch:
        if ev.type is EventType.SYNCED:
            if synced:
                continue
            synced = time.perf_counter()
            if n != keys:
                raise RuntimeError(f"Kv.watch delivered {n} of {keys} keys")
            n = 0
            publish = asyncio.create_task(_publish_updates(writer, kv.bucket, keys, updates))
            continue
        n += 1
        first = first or time.perf_counter()
        if synced and n == updates:
            break
    followed = time.perf_counter()
    await publish
    await watch.aclose()
    return _Round(synced - first, first - called, followed - synced)


async def _round_nats_py(bus: Bus, writer: Bus, bucket: str, flt: str, keys: int, updates: int) -> _Round:
    """The same with nats-py's own KeyValue.watch, decoding each value as Kv.watch does."""
    store = await bus.js.key_value(bucket)
    called = time.perf_counter()
    watcher = await store.watch(flt)
    first = synced = 0.0
    n = 0
    publish = None
    async for entry in watcher:
        if entry is None:
            continue  # nats-py's end-of-initial-values marker: counted entries decide
        codec.decode(entry.value)
        n += 1
        first = first or time.perf_counter()
        if not synced and n == keys:
            synced = time.perf_counter()
            n = 0
            publish = asyncio.create_task(_publish_updates(writer, bucket, keys, updates))
        elif synced and n == updates:
            break
    followed = time.perf_counter()
    assert publish is not None
    await publish
    await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated
    return _Round(synced - first, first - called, followed - synced)


async def _watch_sync(bus: Bus, writer: Bus, keys: int, updates: int, rounds: int) -> list[dict[str, Any]]:
    """Initial sync of ``keys`` values, then ``updates`` followed: Kv.watch vs plain nats-py, rounds
    interleaved so machine noise hits both."""
    kv = await bus.kv(subjects.K8S_BUCKET)
    for i in range(keys):
        await kv.put(subjects.k8s_key("pods", "bench", f"pod-{i}", node="n1"), _pod(i))
    flt = subjects.k8s_keys("pods", "bench")
    times: dict[str, list[_Round]] = {"Kv.watch": [], "nats-py KeyValue.watch": []}
    for _ in range(rounds):
        times["nats-py KeyValue.watch"].append(await _round_nats_py(bus, writer, subjects.K8S_BUCKET, flt, keys,
                                                                    updates))
        times["Kv.watch"].append(await _round_kv_watch(kv, writer, flt, keys, updates))
    rows: list[dict[str, Any]] = []
    for path, samples in times.items():
        sync = statistics.median(r.sync_s for r in samples)
        follow = statistics.median(r.follow_s for r in samples)
        rows.append({"path": path, "keys": keys, "sync_events_per_s": keys / sync, "sync_ms": sync * 1000,
                     "first_event_ms": statistics.median(r.first_s for r in samples) * 1000,
                     "follow_events_per_s": updates / follow})
    kv_row, plain = rows
    kv_row["vs_nats_py"] = (f"sync {kv_row['sync_events_per_s'] / plain['sync_events_per_s']:.0%}, "
                            f"follow {kv_row['follow_events_per_s'] / plain['follow_events_per_s']:.0%}")
    return rows


async def watch_sync(keys: int = 10_000, rounds: int = 3, nats_url: str | None = None, updates: int = 10_000) -> int:
    """`propolis bench kv-watch`: events/s of a KV watch, the project's helper against nats-py, at initial sync
    of ``keys`` values and following ``updates`` pipelined puts (median of interleaved rounds;
    first_event_ms includes Kv.watch's start-up jitter, the rates do not)."""
    with tempfile.TemporaryDirectory(prefix="propolis-bench-") as tmp:
        server = None
        if nats_url is None:
            server = EmbeddedNats(Path(tmp) / "nats", log_file=None)
            nats_url = await server.start()
        bus = Bus(nats_url, name="bench")
        writer = Bus(nats_url, name="bench-writer")
        try:
            await bus.connect(max_wait=5)
            await bus.ensure_buckets()
            await writer.connect(max_wait=5)
            rows = await _watch_sync(bus, writer, keys, updates, rounds)
            report("kv-watch", rows, ["path", "keys", "sync_events_per_s", "sync_ms", "first_event_ms",
                                      "follow_events_per_s", "vs_nats_py"],
                   {"keys": keys, "updates": updates, "rounds": rounds, "value_bytes": len(codec.encode(_pod(0)))})
        finally:
            await writer.close()
            await bus.close()
            if server is not None:
                await server.stop()
    return 0


async def run(messages: int = 100_000, samples: int = 2000, nats_url: str | None = None, rss_settle: float = 5.0) -> int:
    with tempfile.TemporaryDirectory(prefix="propolis-bench-") as tmp:
        server = None
        if nats_url is None:
            server = EmbeddedNats(Path(tmp) / "nats", log_file=None)
            nats_url = await server.start()
        bus = Bus(nats_url, name="bench")
        try:
            await bus.connect(max_wait=5)
            await bus.ensure_buckets()
            raw_payload = codec.encode(_probe(0))
            raw_enc: Callable[[int], bytes] = lambda i: raw_payload
            raw_dec: Callable[[bytes], Any] = lambda b: b
            probe = _probe(0)
            codec_enc: Callable[[int], bytes] = lambda i: codec.encode(probe)
            codec_dec: Callable[[bytes], Any] = lambda b: codec.decode(b, BenchProbe)
            rows: list[dict[str, Any]] = []
            for path, enc, dec in (("raw nats-py bytes", raw_enc, raw_dec), ("propolis codec", codec_enc, codec_dec)):
                rate = await _throughput(bus, messages, enc, dec)
                lat = await _latency(bus, samples, enc, dec)
                rows.append({"path": path, "msgs_per_s": rate, "p50_ms": percentile(lat, 50),
                             "p99_ms": percentile(lat, 99)})
            rows[1]["vs_raw"] = f"{rows[1]['msgs_per_s'] / rows[0]['msgs_per_s']:.0%} (target >= 80%)"
            puts, deliveries = await _kv(bus, samples)
            rows.append({"path": "KV put", "p50_ms": percentile(puts, 50), "p99_ms": percentile(puts, 99),
                         "vs_raw": "target p99 < 1 ms"})
            rows.append({"path": "KV put -> watch delivery", "p50_ms": percentile(deliveries, 50),
                         "p99_ms": percentile(deliveries, 99), "vs_raw": "target p99 < 2 ms"})
            rss = [{**r, "scope": "cluster", "measured": "own process, the bench's NATS, no API server"}
                   for r in await idle_rss({"PROPOLIS_NATS_URL": nats_url}, rss_settle)]
            rss += await sandbox_idle_rss(rss_settle)  # every service, node-scoped ones on their node
            print_table(rss, ["service", "scope", "idle_rss_mb", "target_mb", "measured"])
            report("bus", rows, ["path", "msgs_per_s", "p50_ms", "p99_ms", "vs_raw"],
                   {"messages": messages, "samples": samples, "idle_rss": rss})
        finally:
            await bus.close()
            if server is not None:
                await server.stop()
    return 0
