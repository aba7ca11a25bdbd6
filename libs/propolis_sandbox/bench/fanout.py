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
* initial sync: C consumers at once (a node rebooting, a cluster rebooting) read what they need of a bucket of
  K keys from scratch, both layouts side by side: seconds until every consumer holds its keys, server RSS peak,
  server CPU seconds and deliveries (so the cost per delivery). Full layout: every consumer reads all K keys.
  Per-node layout: the same K keys split as the steady state writes them (1 in `SHARED_SHARE` a compact shared
  entry, the rest node-local, spread over the C nodes), and each consumer reads `node.<its>.>` and `shared.>`.

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
import random
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
#: initial-sync points that would deliver more than this are skipped, not run (whole bucket, 1,000 consumers,
#: 50k keys: 95 GB through one server on a shared 2-core machine), and a point is stopped once the server's RSS
#: passes `SYNC_RSS_ABORT_MB` (the machine's memory is shared): both are reported as such
SYNC_MAX_DELIVERED_GB = 25.0
SYNC_RSS_ABORT_MB = 8000.0
SYNC_TIMEOUT_S = 300.0


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


def _sync_contents(layout: str, keys: int, nodes: int) -> list[tuple[str, int, int | None]]:
    """The initial-sync bucket: (key, value size, owning node or None for a key every node reads)."""
    if layout == "full":
        return [(f"pods.{i % nodes}.{i}", VALUE_SIZE, None) for i in range(keys)]
    return [(f"shared.{i}", SHARED_VALUE_SIZE, None) if i % SHARED_SHARE == 0
            else (f"node.{i % nodes}.{i}", VALUE_SIZE, i % nodes) for i in range(keys)]


def _sync_expected(layout: str, keys: int, nodes: int) -> dict[int, int]:
    """How many keys each node reads at initial sync (its own plus every shared one)."""
    contents = _sync_contents(layout, keys, nodes)
    shared = sum(1 for _, _, owner in contents if owner is None)
    own = {n: 0 for n in range(nodes)}
    for _, _, owner in contents:
        if owner is not None:
            own[owner] += 1
    return {n: own[n] + shared for n in range(nodes)}


# --- the consumer worker (a separate process) ------------------------------------------------------------

async def _worker(url: str, layout: str, nodes: list[int], mode: str, keys: int, cluster_nodes: int) -> None:
    """Watch for every node in `nodes`; print `ready`, then on stdin EOF/`stop` print the figures as JSON.
    mode `steady`: only new updates (deliver new); `sync`: what the node reads of a bucket of `keys` keys laid
    out for `cluster_nodes` nodes, report when complete."""
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
    expected = _sync_expected(layout, keys, cluster_nodes) if mode == "sync" else {}

    def handler(node: int) -> Any:
        async def on_msg(msg: Any) -> None:
            now = time.time()
            counts[node] += 1
            if mode == "steady":
                latencies.append((now - STAMP.unpack_from(msg.data)[0]) * 1000)
            elif counts[node] == expected[node]:
                done_at[node] = now - start
                if len(done_at) == len(nodes):
                    all_synced.set()
        return on_msg

    policy = DeliverPolicy.NEW if mode == "steady" else DeliverPolicy.LAST_PER_SUBJECT
    async def watch(node: int) -> None:
        # one consumer per node even with two filters (NATS 2.10 filter_subjects): the server caps a stream
        # at 1,000 consumers here, so two watches per node would stop a 1,000-node cluster at 500 nodes
        subjects = [f"$KV.{bucket}.{flt}" for flt in _filters(layout, node)]
        deadline = time.monotonic() + SYNC_TIMEOUT_S
        while True:
            # a fresh config each attempt: nats-py writes the deliver inbox into it, and a timed-out attempt's
            # consumer may exist on the server (until its inactive threshold) delivering to that inbox
            config = ConsumerConfig(filter_subjects=subjects) if len(subjects) > 1 else None
            try:
                await js.subscribe(subjects[0], cb=handler(node), ordered_consumer=True, config=config,
                                   deliver_policy=policy, pending_msgs_limit=1_000_000, inactive_threshold=2.0,
                                   pending_bytes_limit=512 * 1024 * 1024)
                return
            except (TimeoutError, nats.errors.Error):
                if time.monotonic() > deadline:
                    raise
                # a busy server answers a consumer creation late: try again after a random delay, as the
                # product's watches do (`Kv.watch`), instead of losing the node
                await asyncio.sleep(random.uniform(0.0, 0.5))

    # all at once, as rebooting nodes do (one after the other, a worker's last consumer was created minutes
    # after its first while the first ones' deliveries filled its connection)
    try:
        await asyncio.gather(*(watch(node) for node in nodes))
    except Exception as exc:  # noqa: BLE001 - the driver reports why this worker could not start its consumers
        print(f"failed: {type(exc).__name__}: {exc}", flush=True)
        return
    print("ready", flush=True)
    if mode == "sync":  # done when every node holds every key (or gives up: the missing ones count as failures)
        try:
            await asyncio.wait_for(all_synced.wait(), SYNC_TIMEOUT_S)
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
             "--nodes", ",".join(map(str, part)), "--mode", mode, "--keys", str(keys),
             "--cluster-nodes", str(nodes)],
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


async def _fill(js: Any, bucket: str, contents: list[tuple[str, int, int | None]], batch: int = 200) -> None:
    """Put every key, `batch` acknowledged puts in flight at a time (a 50k-key bucket in seconds)."""
    for i in range(0, len(contents), batch):
        await asyncio.gather(*(js.publish(f"$KV.{bucket}.{key}", _value(size))
                               for key, size, _ in contents[i:i + batch]))


async def initial_sync(url: str, server_pid: int, layout: str, keys: int, consumers: int) -> dict[str, Any]:
    """`consumers` nodes start at once against a bucket of `keys` keys and read what they need of it (the
    whole bucket, or their own keys plus the shared projection): seconds until each holds its keys, the
    server's RSS peak and CPU seconds (per delivery: what a relay or a bigger cluster would pay)."""
    import nats
    expected = _sync_expected(layout, keys, consumers)
    row: dict[str, Any] = {"part": "initial sync", "layout": layout, "keys": keys, "consumers": consumers,
                           "deliveries": sum(expected.values())}
    contents = _sync_contents(layout, keys, consumers)
    delivered_gb = sum(size * (consumers if owner is None else 1) for _, size, owner in contents) / 1e9
    if delivered_gb > SYNC_MAX_DELIVERED_GB:
        return {**row, "failures": consumers,
                "mark": f"not run: {delivered_gb:.0f} GB to deliver (> {SYNC_MAX_DELIVERED_GB:g} GB)"}
    nc = await nats.connect(url)
    js = nc.jetstream()
    await _fill(js, _bucket(layout), contents)
    rss_before = rss_mb(server_pid)
    cpu0 = _cpu_seconds(server_pid)
    started = time.monotonic()
    workers = Workers(url, layout, consumers, "sync", keys=keys)
    peak, aborted = rss_before, ""
    try:
        await asyncio.get_running_loop().run_in_executor(None, workers.wait_ready, SYNC_TIMEOUT_S)
        while any(proc.poll() is None for proc in workers.procs):  # each exits once its nodes hold their keys
            peak = max(peak, rss_mb(server_pid))
            if peak > SYNC_RSS_ABORT_MB:
                aborted = f"stopped after {time.monotonic() - started:.0f} s: server RSS > {SYNC_RSS_ABORT_MB:g} MB"
                workers.kill()
                break
            await asyncio.sleep(0.1)
        cpu = _cpu_seconds(server_pid) - cpu0
        results = [] if aborted else await asyncio.get_running_loop().run_in_executor(None, workers.collect)
    finally:
        workers.kill()
        await nc.close()
    times = [t for r in results for t in r.get("sync_seconds", [])]
    delivered = sum(r.get("delivered", 0) for r in results)
    complete = len(times)
    return {**row, "complete": complete, "failures": consumers - complete,
            "p50_s": percentile(times, 50) if times else None, "last_s": max(times) if times else None,
            "server_rss_before_mb": round(rss_before, 1), "server_rss_peak_mb": round(peak, 1),
            "server_cpu_s": round(cpu, 2),
            "us_per_delivery": round(1e6 * cpu / delivered, 1) if delivered else None,
            "mark": aborted or ("" if complete == consumers else "FAILED: not every consumer synced")}


async def _sync_point(layout: str, keys: int, consumers: int) -> dict[str, Any]:
    """One initial-sync point on a server of its own: its RSS peak is this point's, not what an earlier
    point left in the server's Go heap (which it returns to the OS only slowly)."""
    import nats
    with tempfile.TemporaryDirectory(prefix="propolis-fanout-sync-") as tmp:
        server = EmbeddedNats(Path(tmp))
        url = await server.start()
        assert server.proc is not None
        try:
            nc = await nats.connect(url)
            await _make_buckets(nc.jetstream())
            await nc.close()
            return await initial_sync(url, server.proc.pid, layout, keys, consumers)
        except Exception as exc:  # noqa: BLE001 - an overloaded point is a figure too: marked
            return {"part": "initial sync", "layout": layout, "keys": keys, "consumers": consumers,
                    "failures": consumers, "mark": f"FAILED: {type(exc).__name__}: {exc}"[:200]}
        finally:
            await server.stop()


async def run(nodes: list[int], rates: list[int], seconds: float, sync_keys: list[int], sync_consumers: list[int],
              sync_layouts: tuple[str, ...] = LAYOUTS) -> int:
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
        finally:
            await server.stop()
    for keys in sync_keys:
        for consumers in sync_consumers:
            for layout in sync_layouts:  # side by side
                sync_rows.append(await _sync_point(layout, keys, consumers))
                print(json.dumps(sync_rows[-1]), file=sys.stderr, flush=True)
    if sync_rows:
        print_table(sync_rows, ["part", "layout", "keys", "consumers", "deliveries", "complete", "p50_s", "last_s",
                                "server_rss_before_mb", "server_rss_peak_mb", "server_cpu_s", "us_per_delivery",
                                "mark"])
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
    parser.add_argument("--cluster-nodes", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(_worker(args.url, args.layout, [int(n) for n in args.nodes.split(",")], args.mode, args.keys,
                        args.cluster_nodes))


if __name__ == "__main__":
    main()
