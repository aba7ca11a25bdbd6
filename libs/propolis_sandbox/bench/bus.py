"""`propolis bench bus`: the codec path against raw nats-py bytes, KV latencies, idle service RSS."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from propolis_sandbox.bench.common import idle_rss, percentile, print_table, report
from propolis.bus import codec, subjects
from propolis.bus.connection import Bus
from propolis.bus.embedded import EmbeddedNats
from propolis.bus.kv import EventType, Kv
from propolis.bus.messages import BenchProbe, K8sObject


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


async def _sync_with_kv_watch(kv: Kv, keys: str, expected: int) -> tuple[float, float]:
    """(seconds from the watch's first event to SYNCED, seconds from the call to its first event)."""
    called = time.perf_counter()
    first = 0.0
    n = 0
    async for ev in kv.watch(keys, follow=False):
        if ev.type is EventType.PUT:
            n += 1
            first = first or time.perf_counter()
    if n != expected:
        raise RuntimeError(f"Kv.watch delivered {n} of {expected} keys")
    return time.perf_counter() - first, first - called


async def _sync_with_nats_py(bus: Bus, bucket: str, keys: str, expected: int) -> tuple[float, float]:
    """The same with nats-py's own KeyValue.watch, decoding each value as Kv.watch does."""
    store = await bus.js.key_value(bucket)
    called = time.perf_counter()
    watcher = await store.watch(keys)
    first = 0.0
    n = 0
    async for entry in watcher:
        if entry is None:
            continue  # nats-py's end-of-initial-values marker: counted entries decide
        codec.decode(entry.value)
        n += 1
        first = first or time.perf_counter()
        if n == expected:
            break
    elapsed = time.perf_counter() - first
    await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated
    return elapsed, first - called


async def _watch_sync(bus: Bus, keys: int, rounds: int) -> list[dict[str, Any]]:
    """Initial sync of ``keys`` values: Kv.watch vs plain nats-py, rounds interleaved so noise hits both."""
    kv = await bus.kv(subjects.K8S_BUCKET)
    for i in range(keys):
        await kv.put(subjects.k8s_key("pods", "bench", f"pod-{i}"), _pod(i))
    flt = subjects.k8s_keys("pods", "bench")
    times: dict[str, list[tuple[float, float]]] = {"Kv.watch": [], "nats-py KeyValue.watch": []}
    for _ in range(rounds):
        times["nats-py KeyValue.watch"].append(await _sync_with_nats_py(bus, subjects.K8S_BUCKET, flt, keys))
        times["Kv.watch"].append(await _sync_with_kv_watch(kv, flt, keys))
    rows: list[dict[str, Any]] = []
    for path, samples in times.items():
        best = statistics.median(t for t, _ in samples)
        rows.append({"path": path, "keys": keys, "events_per_s": keys / best, "sync_ms": best * 1000,
                     "first_event_ms": statistics.median(f for _, f in samples) * 1000})
    rows[0]["vs_nats_py"] = f"{rows[0]['events_per_s'] / rows[1]['events_per_s']:.0%}"
    return rows


async def watch_sync(keys: int = 10_000, rounds: int = 3, nats_url: str | None = None) -> int:
    """`propolis bench kv-watch`: events/s of a KV watch's initial sync, the project's helper against nats-py
    (median of interleaved rounds; first_event_ms includes Kv.watch's start-up jitter, sync_ms does not)."""
    with tempfile.TemporaryDirectory(prefix="propolis-bench-") as tmp:
        server = None
        if nats_url is None:
            server = EmbeddedNats(Path(tmp) / "nats", log_file=None)
            nats_url = await server.start()
        bus = Bus(nats_url, name="bench")
        try:
            await bus.connect(max_wait=5)
            await bus.ensure_buckets()
            rows = await _watch_sync(bus, keys, rounds)
            report("kv-watch", rows, ["path", "keys", "events_per_s", "sync_ms", "first_event_ms", "vs_nats_py"],
                   {"keys": keys, "rounds": rounds, "value_bytes": len(codec.encode(_pod(0)))})
        finally:
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
            raw_enc: Callable[[int], bytes] = lambda i: raw_payload  # noqa: E731 - same bytes, no codec
            raw_dec: Callable[[bytes], Any] = lambda b: b  # noqa: E731
            probe = _probe(0)
            codec_enc: Callable[[int], bytes] = lambda i: codec.encode(probe)  # noqa: E731
            codec_dec: Callable[[bytes], Any] = lambda b: codec.decode(b, BenchProbe)  # noqa: E731
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
            rss = await idle_rss({"PROPOLIS_NATS_URL": nats_url}, rss_settle)
            print_table(rss, ["service", "idle_rss_mb", "target_mb"])
            report("bus", rows, ["path", "msgs_per_s", "p50_ms", "p99_ms", "vs_raw"],
                   {"messages": messages, "samples": samples, "idle_rss": rss})
        finally:
            await bus.close()
            if server is not None:
                await server.stop()
    return 0
