"""`propolis bench flows`: sustained flows/s from the BPF ring buffer through the real `propolis-hubble`
process to a NATS subscriber on one node, with every lost event counted where it was lost.

How: a throw-away node (unique pin dir, removed afterwards) with monitor aggregation `none`, so every packet
the program sees is one trace event. The bus holds a realistic cluster view for the enricher: `identities`
identities, `endpoints` local pods (EndpointRecords) and `peers` remote addresses (ipcache rows), and the
datapath has the same pods and ipcache rows. A thread in this process drives bpf_lxc with
BPF_PROG_TEST_RUN over `flows` distinct established 5-tuples (a peer to a pod, several ports) in small
batches, round robin, at the target rate, while `churn` ipcache changes per second arrive on the bus (each
empties the enricher's endpoint cache, as pod churn does in a live cluster): enrichment misses as in life.
The observer is the `propolis-hubble` service as deployed (its own process, reading the pinned ring, watching
the buckets, publishing flows); a separate subscriber process counts flows, sequence gaps and
event->receipt delay. Accounting per rate: generated = observed + lost in the BPF ring (hubble's heartbeat:
flows_seen, lost_events_by_type), and observed = received + lost on the bus (gaps).
"""

from __future__ import annotations

import asyncio
import calendar
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from propolis.model.types import NumericIdentity
from propolis_sandbox.bench.common import percentile

# Imports sit in the functions that need them: the subscriber children run this module too and
# should not load bcc and the datapath.

NODE_PREFIX = "bench-flows"
DPORTS = (80, 443, 8080, 5432)
IDENTITY_BASE = 1000


def _pod_ip(i: int) -> str:
    return f"10.200.{i // 250}.{i % 250 + 1}"


def _peer_ip(j: int) -> str:
    return f"10.201.{j // 250}.{j % 250 + 1}"


def _wall(rfc: str) -> float:
    return calendar.timegm(time.strptime(rfc[:19], "%Y-%m-%dT%H:%M:%S")) + int(rfc[20:29]) / 1e9


async def _subscriber(url: str) -> None:
    """Child process: count flows and gaps until SIGTERM, then print one JSON line."""
    import nats

    from propolis.bus import codec, subjects
    from propolis.bus.messages import FlowMessage
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    received, gaps = 0, 0
    delays: list[float] = []
    last: dict[str, int] = {}
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def on_msg(msg: Any) -> None:
        nonlocal received, gaps
        m = codec.decode(msg.data)
        if not isinstance(m, FlowMessage):
            return
        received += 1
        prev = last.get(m.instance)
        if prev is not None and m.seq > prev + 1:
            gaps += m.seq - prev - 1
        last[m.instance] = m.seq
        if received % 50 == 0:
            delays.append(time.time() - _wall(m.flow["time"]))

    await nc.subscribe(subjects.FLOWS_ALL, cb=on_msg, pending_msgs_limit=1_000_000,
                       pending_bytes_limit=512 * 1024 * 1024)
    await nc.flush()
    print("ready", flush=True)
    await stop.wait()
    await nc.flush()
    print(json.dumps({"received": received, "gaps": gaps,
                      "delay_p50_ms": round(percentile(delays, 50) * 1000, 2) if delays else None,
                      "delay_p99_ms": round(percentile(delays, 99) * 1000, 2) if delays else None}), flush=True)
    await nc.close()


async def _relay_subscriber(relay_url: str) -> None:
    """Child process: what `propolis observe --follow -o jsonpb` does (HTTP NDJSON from the relay),
    counting flows, lost-event notices and event->print delay until SIGTERM."""
    import aiohttp
    import orjson
    received, lost, delays = 0, 0, []
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def follow() -> None:
        nonlocal received, lost
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as http:
            for _ in range(100):  # the relay may still be starting
                try:
                    resp = await http.post(f"{relay_url}/api/v1/flows", json={"follow": True})
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            async with resp:
                print("ready", flush=True)
                async for line in resp.content:
                    doc = orjson.loads(line)
                    if "lost_events" in doc:
                        lost += doc["lost_events"]["num_events_lost"]
                        continue
                    received += 1
                    if received % 50 == 0:
                        delays.append(time.time() - _wall(doc["time"]))

    task = asyncio.create_task(follow())
    await stop.wait()
    task.cancel()
    print(json.dumps({"received": received, "gaps": lost,
                      "delay_p50_ms": round(percentile(delays, 50) * 1000, 2) if delays else None,
                      "delay_p99_ms": round(percentile(delays, 99) * 1000, 2) if delays else None}), flush=True)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _drive(fd: int, packets: list[bytes], rate: int, seconds: float, sent: list[int]) -> None:
    """Generator thread: `rate` events/s as BPF_PROG_TEST_RUN batches of at most 10 repeats of one 5-tuple,
    the 5-tuples round robin, paced 2,000 calls a second at most."""
    from propolis.maps import bpf
    batch = max(1, min(10, rate // 2000))
    interval = batch / rate
    start = time.perf_counter()
    n = 0
    while True:
        due = start + n * interval
        if due - start >= seconds:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        bpf.prog_test_run(fd, packets[n % len(packets)], repeat=batch)
        sent[0] += batch
        n += 1


class Workload:
    """The cluster view (bus and datapath) and the 5-tuples the driver replays."""

    def __init__(self, identities: int, endpoints: int, peers: int, flows: int) -> None:
        self.identities, self.endpoints, self.peers, self.flows = identities, endpoints, peers, flows

    def identity_of_pod(self, i: int) -> int:
        return IDENTITY_BASE + i % self.identities

    def identity_of_peer(self, j: int) -> NumericIdentity:
        return NumericIdentity(IDENTITY_BASE + (j * 7 + 3) % self.identities)

    async def publish(self, bus: Any, node: str) -> None:
        from propolis.bus import subjects
        from propolis.bus.messages import EndpointRecord, IdentityRecord, IpcacheEntry
        ids, ipc = await bus.kv(subjects.IDENTITIES_BUCKET), await bus.kv(subjects.IPCACHE_BUCKET)
        for n in range(self.identities):
            number = IDENTITY_BASE + n
            await ids.put(subjects.identity_key(number), IdentityRecord(number, self.labels(n)))
        for i in range(self.endpoints):
            ns, pod = f"ns-{i % 20}", f"app-{i % self.identities}-{i}"
            await ids.put(subjects.endpoint_key(ns, pod), EndpointRecord(
                ns, pod, node, [_pod_ip(i)], self.identity_of_pod(i), self.labels(i % self.identities)))
        for j in range(self.peers):
            await ipc.put(subjects.ipcache_key(f"{node}-peer{j % 50}", _peer_ip(j)),
                          IpcacheEntry(_peer_ip(j), 32, self.identity_of_peer(j), f"{node}-peer{j % 50}"))

    @staticmethod
    def labels(n: int) -> list[str]:
        return [f"k8s:app=app-{n}", f"k8s:io.kubernetes.pod.namespace=ns-{n % 20}", "k8s:tier=bench"]

    def program(self, dp: Any) -> list[bytes]:
        """Pods and ipcache rows into the datapath; every 5-tuple opened once (SYN: its conntrack entry);
        returns the established-ACK packets the driver replays."""
        from propolis.datapath import packets as pk
        from propolis.datapath.entries import IPCacheEntry
        from propolis.maps import bpf
        for i in range(self.endpoints):
            dp.upsert_endpoint(endpoint_id=i + 1, ip=_pod_ip(i), identity=self.identity_of_pod(i), ifindex=1,
                               ingress_enforced=False, egress_enforced=False)
        dp.set_ipcache([IPCacheEntry(_peer_ip(j), self.identity_of_peer(j)) for j in range(self.peers)])
        packets = []
        for f in range(self.flows):
            peer, pod, sport = _peer_ip(f % self.peers), _pod_ip(f * 31 % self.endpoints), 10000 + f % 50000
            dport = DPORTS[f % len(DPORTS)]
            bpf.prog_test_run(dp.programs.to_container_fd, pk.tcp(peer, sport, pod, dport))
            packets.append(pk.tcp(peer, sport, pod, dport, pk.TCP_ACK))
        return packets

    async def churn(self, bus: Any, node: str, per_second: float) -> None:
        """Until cancelled: one peer's ipcache row moves to another identity `per_second` times a second."""
        from propolis.bus import subjects
        from propolis.bus.messages import IpcacheEntry
        if per_second <= 0:
            return
        ipc = await bus.kv(subjects.IPCACHE_BUCKET)
        k = 0
        while True:
            j = k * 13 % self.peers
            await ipc.put(subjects.ipcache_key(f"{node}-peer{j % 50}", _peer_ip(j)),
                          IpcacheEntry(_peer_ip(j), 32, self.identity_of_peer(j + k), f"{node}-peer{j % 50}"))
            k += 1
            await asyncio.sleep(1 / per_second)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _hubble_counts(bus: Any, node: str, after: float) -> tuple[int, int]:
    """(flows seen, events lost in the BPF ring) from hubble's first heartbeat sent after `after`."""
    from propolis.runtime.heartbeats import newest, read_heartbeats
    deadline = time.time() + 15
    while time.time() < deadline:
        hb = newest(await read_heartbeats(bus), "hubble", node)
        if hb is not None and hb.sent_at > after and "flows_seen" in hb.progress:
            lost = sum(c.get("ring_full", 0) for c in (hb.progress.get("lost_events_by_type") or {}).values())
            return int(hb.progress["flows_seen"]), lost
        await asyncio.sleep(0.1)
    raise RuntimeError(f"no heartbeat with flows_seen from hubble on {node} within 15 s")


async def _settled(bus: Any, node: str, timeout: float, at_least: int = 0) -> tuple[int, int]:
    """Hubble's (flows seen, ring losses) once their sum reaches `at_least` and stopped moving for half a
    second (or after `timeout`): a run starts and ends on a drained observer, never charged with a backlog."""
    deadline = time.perf_counter() + timeout
    last = await _hubble_counts(bus, node, time.time())
    while time.perf_counter() < deadline:
        await asyncio.sleep(0.5)
        now = await _hubble_counts(bus, node, time.time())
        if now == last and sum(now) >= at_least:
            break
        last = now
    return last


async def _one_rate(dp: Any, bus: Any, url: str, node: str, hubble: subprocess.Popen[bytes], packets: list[bytes],
                    workload: Workload, rate: int, seconds: float, churn: float,
                    via_relay: bool = False) -> dict[str, Any]:
    relay = None
    if via_relay:  # the real relay process between the bus and the follower, as `observe --follow` uses it
        relay_url = f"http://127.0.0.1:{_free_port()}"
        relay = subprocess.Popen([sys.executable, "-m", "propolis_services.hubble_relay.main", "--nats-url", url,
                                  "--hubble-relay-listen-address", relay_url[7:], "--node-name", "bench-relay",
                                  "--http-port", "-1", "--log-level", "warning"])
        sub = subprocess.Popen([sys.executable, "-m", "propolis_sandbox.bench.flows", "follow", relay_url],
                               stdout=subprocess.PIPE, text=True)
    else:
        sub = subprocess.Popen([sys.executable, "-m", "propolis_sandbox.bench.flows", "subscribe", url],
                               stdout=subprocess.PIPE, text=True)
    assert sub.stdout is not None
    await asyncio.to_thread(sub.stdout.readline)  # "ready"
    seen_before, lost_before = await _settled(bus, node, 60.0)
    churner = asyncio.create_task(workload.churn(bus, node, churn))
    sent = [0]
    cpu0, wall0 = _cpu_seconds(hubble.pid), time.perf_counter()
    await asyncio.to_thread(_drive, dp.programs.to_container_fd, packets, rate, seconds, sent)
    wall = time.perf_counter() - wall0
    churner.cancel()
    await asyncio.gather(churner, return_exceptions=True)
    seen, lost = await _settled(bus, node, 60.0, seen_before + lost_before + sent[0])  # drained, or 60 s
    cpu = _cpu_seconds(hubble.pid) - cpu0
    drain = time.perf_counter() - wall0 - wall
    await asyncio.sleep(0.3)
    sub.send_signal(signal.SIGTERM)
    out, _ = await asyncio.to_thread(sub.communicate, None, 30)
    got = json.loads(out.strip().splitlines()[-1])
    if relay is not None:
        relay.terminate()
        relay.wait(10)
    observed, lost = seen - seen_before, lost - lost_before
    return {"path": "relay follow" if via_relay else "NATS subscriber", "target_per_s": rate,
            "seconds": round(wall, 1), "generated": sent[0], "achieved_per_s": round(sent[0] / wall),
            "observed": observed, "lost_bpf_ring": lost, "received_by_subscriber": got["received"],
            "lost_on_bus": got["gaps"], "loss_pct": round(100 * (sent[0] - got["received"]) / max(1, sent[0]), 3),
            "accounted": sent[0] == observed + lost and observed == got["received"] + got["gaps"],
            "hubble_cpu_pct_of_core": round(100 * cpu / (wall + drain), 1),
            "delay_p50_ms": got["delay_p50_ms"], "delay_p99_ms": got["delay_p99_ms"]}


async def run(rates: list[int], seconds: float, nats_url: str | None = None, follow_rate: int = 0,
              identities: int = 1000, endpoints: int = 200, peers: int = 4000, flows: int = 8000,
              churn: float = 20.0) -> dict[str, Any]:
    """Each rate through a NATS subscriber; with `follow_rate`, one more run through the relay to an
    `observe --follow`-style HTTP client (end-to-end delay)."""
    import tempfile

    from propolis import suite
    from propolis.bus.connection import Bus
    from propolis.bus.embedded import EmbeddedNats
    from propolis.datapath.datapath import Datapath, DatapathSettings
    server = None
    if not nats_url:
        server = EmbeddedNats(tempfile.mkdtemp(prefix="bench-flows-nats-"))
        await asyncio.to_thread(server.start_sync)
        nats_url = server.url
    node = f"{NODE_PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    dp = Datapath(node, settings=DatapathSettings(monitor_aggregation="none"))
    workload = Workload(identities, endpoints, peers, flows)
    bus = Bus(nats_url, name="bench-flows")
    hubble: subprocess.Popen[bytes] | None = None
    results: list[dict[str, Any]] = []
    try:
        await bus.connect(max_wait=5)
        await bus.ensure_buckets()
        await dp.load()
        packets = workload.program(dp)
        await workload.publish(bus, node)
        hubble = subprocess.Popen([*suite.selected("hubble")[0].command({"node": node}), "--nats-url", nats_url,
                                   "--node-name", node,
                                   "--bpf-pin-dir", dp.pin_dir, "--http-port", "-1", "--heartbeat-interval", "0.2",
                                   "--lost-poll-interval", "0.1", "--log-level", "warning"])
        await _hubble_counts(bus, node, 0.0)  # running and reading the ring
        runs = [(rate, False) for rate in rates] + ([(follow_rate, True)] if follow_rate else [])
        for rate, via_relay in runs:
            results.append(await _one_rate(dp, bus, nats_url, node, hubble, packets, workload, rate, seconds, churn,
                                           via_relay))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        if hubble is not None:
            hubble.terminate()
            try:
                hubble.wait(10)
            except subprocess.TimeoutExpired:
                hubble.kill()
                hubble.wait()
        await bus.close()
        await dp.remove_all()
        if server is not None:
            await asyncio.to_thread(server.stop_sync)
    return {"rows": results, "workload": {"identities": identities, "endpoints": endpoints, "peers": peers,
                                          "five_tuples": flows, "churn_per_s": churn,
                                          "observer": "propolis-hubble process"}}


if __name__ == "__main__":
    if sys.argv[1:2] == ["subscribe"]:
        asyncio.run(_subscriber(sys.argv[2]))
    elif sys.argv[1:2] == ["follow"]:
        asyncio.run(_relay_subscriber(sys.argv[2]))
