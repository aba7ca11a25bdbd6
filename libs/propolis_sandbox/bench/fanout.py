"""`propolis bench fanout`: what one nats-server pays to tell N nodes about changes, for two key layouts.

Why: every datapath-writer watching the whole cluster bucket makes the server deliver each update N times
(N = nodes), so server CPU and put->delivery latency grow with the cluster; a layout with the node in the
key (`node.<n>.…`) lets each node watch only its own keys plus a small shared projection, so an update is
delivered about once. This bench measures both side by side in one run against the same server:

* steady state: a writer puts ~1.9 KB values (the size of a mirrored Pod) at R updates/s; N simulated nodes
  (ordered consumers over plain nats-py, spread over several worker processes so the load generator stays
  light) record put->delivery latency from the timestamp in each value. Per point: p50/p99, the share of
  expected deliveries that arrived ("delivered"; history 1 lets a slow watcher skip revisions, which a
  level-based consumer tolerates, so fewer than 100 % is a figure, not an error), the server's CPU (cores,
  from /proc) and RSS.
* initial sync: one consumer, then 100 at once, read a bucket of K keys from scratch (a node rebooting, a
  cluster rebooting): seconds until every consumer holds every key, server RSS peak.

Full layout: every update is a full-size value under `pods.<node>.<pod>` and every node watches `>`.
Per-node layout: 90 % of updates are node-local (full size, `node.<node>.<pod>`), 10 % go to a compact shared
projection (`shared.<k>`, ~200 B, what every node needs, e.g. identities); a node watches `node.<its>.>` and
`shared.>`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from propolis.bus.embedded import EmbeddedNats
from propolis_sandbox.bench.common import percentile, print_table, report, rss_mb

VALUE_SIZE = 1900  # bytes: a mirrored Pod object on the bus
SHARED_VALUE_SIZE = 200  # bytes: one entry of a compact projection (identity labels, ipcache entry)
SHARED_SHARE = 10  # every 10th update of the per-node layout goes to the shared projection
WORKERS = 4  # consumer processes (2 cores: more only adds scheduling)
STAMP = struct.Struct("!d")  # the put time, first bytes of every value
LAYOUTS = ("full", "per-node")


@dataclass
class Point:
    layout: str
    nodes: int
    rate: int
    latencies_ms: list[float]
    delivered: int
    expected: int
    server_cores: float
    server_rss_mb: float
    failures: int

    def row(self) -> dict[str, Any]:
        ok = self.failures == 0
        return {"layout": self.layout, "nodes": self.nodes, "updates_per_s": self.rate,
                "p50_ms": percentile(self.latencies_ms, 50) if ok else None,
                "p99_ms": percentile(self.latencies_ms, 99) if ok else None,
                "delivered_pct": round(100 * self.delivered / self.expected, 1) if self.expected else None,
                "server_cores": round(self.server_cores, 3), "server_rss_mb": round(self.server_rss_mb, 1),
                "failures": self.failures, "mark": "" if ok else "FAILED (not averaged)"}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _filters(layout: str, node: int) -> list[str]:
    return [">"] if layout == "full" else [f"node.{node}.>", "shared.>"]


def _bucket(layout: str) -> str:
    return "FANOUT_FULL" if layout == "full" else "FANOUT_NODE"


# --- the consumer worker (a separate process) ------------------------------------------------------------

async def _worker(url: str, layout: str, nodes: list[int], mode: str, keys: int) -> None:
    """Watch for every node in `nodes`; print `ready`, then on stdin EOF/`stop` print the figures as JSON.
    mode `steady`: only new updates (deliver new); `sync`: everything in the bucket, report when complete."""
    import nats
    from nats.js.api import ConsumerConfig, DeliverPolicy

    nc = await nats.connect(url, max_reconnect_attempts=0, pending_size=256 * 1024 * 1024)
    js = nc.jetstream()
    latencies: list[float] = []
    counts = {n: 0 for n in nodes}
    done_at: dict[int, float] = {}
    start = time.time()
    bucket = _bucket(layout)
    all_synced = asyncio.Event()

    def handler(node: int) -> Any:
        async def on_msg(msg: Any) -> None:
            now = time.time()
            counts[node] += 1
            if mode == "steady":
                latencies.append((now - STAMP.unpack_from(msg.data)[0]) * 1000)
            elif counts[node] == keys:
                done_at[node] = now - start
                if len(done_at) == len(nodes):
                    all_synced.set()
        return on_msg

    policy = DeliverPolicy.NEW if mode == "steady" else DeliverPolicy.LAST_PER_SUBJECT
    for node in nodes:
        # one consumer per node even with two filters (NATS 2.10 filter_subjects): the server caps a stream
        # at 1,000 consumers here, so two watches per node would stop a 1,000-node cluster at 500 nodes
        subjects = [f"$KV.{bucket}.{flt}" for flt in _filters(layout, node)]
        config = ConsumerConfig(filter_subjects=subjects) if len(subjects) > 1 else None
        await js.subscribe(subjects[0], cb=handler(node), ordered_consumer=True, config=config,
                           deliver_policy=policy, pending_msgs_limit=1_000_000, inactive_threshold=2.0,
                           pending_bytes_limit=512 * 1024 * 1024)
    print("ready", flush=True)
    if mode == "sync":  # done when every node holds every key (or gives up: the missing ones count as failures)
        try:
            await asyncio.wait_for(all_synced.wait(), 300)
        except TimeoutError:
            pass
    else:  # until the driver has written everything and says stop
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    print(json.dumps({"latencies_ms": latencies, "delivered": sum(counts.values()), "counts": counts,
                      "sync_seconds": list(done_at.values())}), flush=True)
    await nc.close()


# --- the driver ----------------------------------------------------------------------------------------

class Workers:
    """Consumer processes covering `nodes` simulated nodes, started together, stopped together."""

    def __init__(self, url: str, layout: str, nodes: int, mode: str, keys: int = 0) -> None:
        share = [list(range(w, nodes, WORKERS)) for w in range(min(WORKERS, nodes))]
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "propolis_sandbox.bench.fanout", "--worker", "--url", url, "--layout", layout,
             "--nodes", ",".join(map(str, part)), "--mode", mode, "--keys", str(keys)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for part in share]

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "ready" or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"fanout worker not ready: {line!r}")

    def collect(self) -> list[dict[str, Any]]:
        """Tell every worker to stop, then read its figures (through the same buffered reader `wait_ready`
        used: the figures may already sit in its buffer)."""
        for proc in self.procs:
            try:
                assert proc.stdin is not None
                proc.stdin.write("stop\n")
                proc.stdin.close()
            except BrokenPipeError:
                pass  # a sync worker that finished and exited
        out: list[dict[str, Any]] = []
        for proc in self.procs:
            assert proc.stdout is not None
            try:
                out.append(json.loads(proc.stdout.read().strip().splitlines()[-1]))
            except (ValueError, IndexError):
                out.append({"failed": True})
            proc.wait()
        return out

    def kill(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def _value(size: int) -> bytes:
    return STAMP.pack(time.time()) + b"x" * (size - STAMP.size)


async def _make_buckets(js: Any) -> None:
    from nats.js.api import KeyValueConfig
    for layout in LAYOUTS:
        try:
            await js.delete_key_value(_bucket(layout))
        except Exception:  # noqa: BLE001 - cleanup: the bucket may be gone already
            pass
        await js.create_key_value(KeyValueConfig(bucket=_bucket(layout), history=1))


async def _write(js: Any, layout: str, nodes: int, rate: int, seconds: float) -> dict[int, int]:
    """Put at `rate` updates/s for `seconds`; return how many updates each simulated node should receive."""
    bucket = _bucket(layout)
    per_node = {n: 0 for n in range(nodes)}
    shared = 0
    total = int(rate * seconds)
    start = time.monotonic()
    for i in range(total):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        node, pod = i % nodes, i % 997
        if layout == "per-node" and i % SHARED_SHARE == 0:
            await js.publish(f"$KV.{bucket}.shared.{i % 512}", _value(SHARED_VALUE_SIZE))
            shared += 1
        else:
            subject = f"pods.{node}.{pod}" if layout == "full" else f"node.{node}.{pod}"
            await js.publish(f"$KV.{bucket}.{subject}", _value(VALUE_SIZE))
            per_node[node] += 1
    if layout == "full":
        return {n: total for n in range(nodes)}
    return {n: per_node[n] + shared for n in range(nodes)}


async def _consumers_gone(js: Any, bucket: str, timeout: float = 60.0) -> None:
    """Wait until the server has dropped the stopped workers' ephemeral consumers (it does so after their
    inactivity threshold), so the next point starts from zero consumers instead of hitting the limit."""
    deadline = time.monotonic() + timeout
    import nats.errors
    while time.monotonic() < deadline:
        try:
            if (await js.stream_info(f"KV_{bucket}")).state.consumer_count == 0:
                return
        except nats.errors.TimeoutError:
            pass  # an overloaded server answers late: ask again
        await asyncio.sleep(0.5)


async def steady(url: str, server_pid: int, layout: str, nodes: int, rate: int, seconds: float) -> Point:
    import nats
    nc = await nats.connect(url)
    js = nc.jetstream()
    workers = Workers(url, layout, nodes, "steady")
    try:
        await asyncio.get_running_loop().run_in_executor(None, workers.wait_ready)
        cpu0, t0 = _cpu_seconds(server_pid), time.monotonic()
        expected = await _write(js, layout, nodes, rate, seconds)
        await asyncio.sleep(1.0)  # the last deliveries
        cpu = (_cpu_seconds(server_pid) - cpu0) / (time.monotonic() - t0)
        results = await asyncio.get_running_loop().run_in_executor(None, workers.collect)
        await _consumers_gone(js, _bucket(layout))
    finally:
        workers.kill()
        await nc.close()
    latencies = [x for r in results for x in r.get("latencies_ms", [])]
    return Point(layout, nodes, rate, latencies, sum(r.get("delivered", 0) for r in results),
                 sum(expected.values()), cpu, rss_mb(server_pid), sum(1 for r in results if r.get("failed")))


async def initial_sync(url: str, server_pid: int, layout: str, keys: int, consumers: int) -> dict[str, Any]:
    """`consumers` nodes start at once against a bucket of `keys` keys they all need (full layout: every key;
    per-node: the same number of keys spread over 10 nodes' prefixes + shared would be smaller, so this
    measures the full-bucket read, the worst case a rebooting node meets)."""
    import nats
    nc = await nats.connect(url)
    js = nc.jetstream()
    bucket = _bucket("full")
    for i in range(keys):
        await js.publish(f"$KV.{bucket}.pods.0.{i}", _value(VALUE_SIZE))
    rss_before = rss_mb(server_pid)
    workers = Workers(url, "full", consumers, "sync", keys=keys)
    peak = rss_before
    try:
        await asyncio.get_running_loop().run_in_executor(None, workers.wait_ready)
        while any(proc.poll() is None for proc in workers.procs):  # each exits once its nodes hold every key
            peak = max(peak, rss_mb(server_pid))
            await asyncio.sleep(0.1)
        results = await asyncio.get_running_loop().run_in_executor(None, workers.collect)
    finally:
        workers.kill()
        await nc.close()
    times = [t for r in results for t in r.get("sync_seconds", [])]
    complete = len(times)
    return {"part": "initial sync", "keys": keys, "consumers": consumers, "complete": complete,
            "failures": consumers - complete, "p50_s": percentile(times, 50) if times else None,
            "last_s": max(times) if times else None, "server_rss_before_mb": round(rss_before, 1),
            "server_rss_peak_mb": round(peak, 1)}


async def run(nodes: list[int], rates: list[int], seconds: float, sync_keys: int, sync_consumers: list[int]) -> int:
    rows: list[dict[str, Any]] = []
    sync_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="propolis-fanout-") as tmp:
        server = EmbeddedNats(Path(tmp))
        url = await server.start()
        assert server.proc is not None
        pid = server.proc.pid
        try:
            import nats
            nc = await nats.connect(url)
            await _make_buckets(nc.jetstream())
            await nc.close()
            for rate in rates:
                for n in nodes:
                    for layout in LAYOUTS:  # interleaved: machine noise hits both layouts alike
                        try:
                            rows.append((await steady(url, pid, layout, n, rate, seconds)).row())
                        except Exception as exc:  # noqa: BLE001 - an overloaded point is a figure too: marked
                            rows.append({"layout": layout, "nodes": n, "updates_per_s": rate, "failures": 1,
                                         "mark": f"FAILED: {type(exc).__name__}: {exc}"[:120]})
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            for consumers in sync_consumers:
                nc = await nats.connect(url)
                await _make_buckets(nc.jetstream())
                await nc.close()
                sync_rows.append(await initial_sync(url, pid, "full", sync_keys, consumers))
        finally:
            await server.stop()
    if sync_rows:
        print_table(sync_rows, ["part", "keys", "consumers", "complete", "failures", "p50_s", "last_s",
                                "server_rss_before_mb", "server_rss_peak_mb"])
        print()
    report("fanout", rows, extra={"initial_sync": sync_rows, "value_bytes": VALUE_SIZE, "seconds": seconds})
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description="bench fanout consumer worker (internal)")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--url", required=True)
    parser.add_argument("--layout", choices=LAYOUTS, required=True)
    parser.add_argument("--nodes", required=True)
    parser.add_argument("--mode", choices=("steady", "sync"), required=True)
    parser.add_argument("--keys", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(_worker(args.url, args.layout, [int(n) for n in args.nodes.split(",")], args.mode, args.keys))


if __name__ == "__main__":
    main()
