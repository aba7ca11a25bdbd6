"""`propolis bench bus`: the codec path against raw nats-py bytes, KV latencies, idle service RSS."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from propolis_sandbox.bench.common import idle_rss, percentile, report
from propolis.bus import codec, subjects
from propolis.bus.connection import Bus
from propolis.bus.embedded import EmbeddedNats
from propolis.bus.kv import EventType
from propolis.bus.messages import BenchProbe


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
            report("bus", rows, ["path", "msgs_per_s", "p50_ms", "p99_ms", "vs_raw"],
                   {"messages": messages, "samples": samples})
            rss = await idle_rss({"PROPOLIS_NATS_URL": nats_url}, rss_settle)
            report("service-idle-rss", rss, ["service", "idle_rss_mb", "target_mb"])
        finally:
            await bus.close()
            if server is not None:
                await server.stop()
    return 0
