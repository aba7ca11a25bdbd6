"""`propolis bench flows`: sustained flows/s from the BPF ring buffer through the observer to a NATS
subscriber on one node, with every lost event counted where it was lost.

How: a throw-away node (unique pin dir, removed afterwards) with monitor aggregation `none`, so
every packet the program sees is one trace event. A thread drives bpf_lxc with
BPF_PROG_TEST_RUN (an established TCP ACK to the pod: one event per run) at the target rate; the
observer (ring buffer, Hubble metrics, publish) runs in this process's event loop as in the
service; a separate subscriber process counts flows, sequence gaps and event->receipt delay.
Accounting per rate: generated = observed + lost in the BPF ring (cilium_events_lost), and
observed = received + lost on the bus (gaps).
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
from typing import Any

from propolis_sandbox.bench.common import percentile

# Imports sit in the functions that need them: the subscriber children run this module too and
# should not load bcc and the datapath.

_POD, _PEER, _ENDPOINT = "10.200.0.10", "10.201.0.1", 1


def _wall(rfc: str) -> float:
    return calendar.timegm(time.strptime(rfc[:19], "%Y-%m-%dT%H:%M:%S")) + int(rfc[20:29]) / 1e9


async def _subscriber(url: str) -> None:
    """Child process: count flows and gaps until SIGTERM, then print one JSON line."""
    import nats
    from propolis.bus import codec, subjects
    from propolis.bus.messages import FlowMessage
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    received, gaps, delays, last = 0, 0, [], {}
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


def _drive(fd: int, packet: bytes, rate: int, seconds: float, sent: list[int]) -> None:
    """Generator thread: `rate` events/s as BPF_PROG_TEST_RUN batches, 200 batches a second."""
    from propolis.maps import bpf
    batch = max(1, rate // 200)
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
        bpf.prog_test_run(fd, packet, repeat=batch)
        sent[0] += batch
        n += 1


async def _one_rate(dp: Any, url: str, rate: int, seconds: float, via_relay: bool = False) -> dict[str, Any]:
    from propolis.bus.connection import Bus
    from propolis.datapath import packets as pk
    from propolis.hubble.flow import Enricher
    from propolis.hubble.metrics import FlowMetrics
    from propolis.hubble.observer import Observer
    from propolis.maps import events as ev
    import prometheus_client
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
    bus = Bus(url, name="bench-flows")
    await bus.connect(max_wait=5)
    reader = ev.EventReader(dp.pin_dir)
    reader.read()  # start from an empty ring
    obs = Observer("bench", enricher=Enricher(), sinks=[FlowMetrics(prometheus_client.CollectorRegistry(),
                                                                    "{drop,tcp,flow,icmp,port-distribution,policy}")],
                   publish=bus.nc.publish)
    lost_before = reader.lost()
    run = asyncio.create_task(obs.run(reader.stream()))
    sent = [0]
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    await asyncio.to_thread(_drive, dp.programs.to_container_fd, pk.tcp(_PEER, 40000, _POD, 443, pk.TCP_ACK),
                            rate, seconds, sent)
    wall = time.perf_counter() - wall0
    lost = reader.lost() - lost_before
    while obs.ring.seen + lost < sent[0]:  # drain what the ring still holds
        await asyncio.sleep(0.05)
    cpu = time.thread_time() - cpu0
    drain = time.perf_counter() - wall0 - wall
    await bus.nc.flush()
    await asyncio.sleep(0.3)
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    reader.close()
    await bus.close()
    sub.send_signal(signal.SIGTERM)
    out, _ = await asyncio.to_thread(sub.communicate, None, 30)
    got = json.loads(out.strip().splitlines()[-1])
    if relay is not None:
        relay.terminate()
        relay.wait(10)
    observed = obs.ring.seen
    return {"path": "relay follow" if via_relay else "NATS subscriber", "target_per_s": rate, "seconds": round(wall, 1), "generated": sent[0],
            "achieved_per_s": round(sent[0] / wall), "observed": observed,
            "lost_bpf_ring": lost, "received_by_subscriber": got["received"], "lost_on_bus": got["gaps"],
            "loss_pct": round(100 * (sent[0] - got["received"]) / max(1, sent[0]), 3),
            "accounted": sent[0] == observed + lost and observed == got["received"] + got["gaps"],
            "observer_cpu_pct_of_core": round(100 * cpu / (wall + drain), 1),
            "delay_p50_ms": got["delay_p50_ms"], "delay_p99_ms": got["delay_p99_ms"]}


async def run(rates: list[int], seconds: float, nats_url: str | None = None,
              follow_rate: int = 0) -> list[dict[str, Any]]:
    """Each rate through a NATS subscriber; with `follow_rate`, one more run through the relay to an
    `observe --follow`-style HTTP client (end-to-end delay)."""
    from propolis.bus.embedded import EmbeddedNats
    from propolis.datapath.datapath import Datapath, DatapathSettings
    from propolis.datapath.entries import IPCacheEntry
    from propolis.datapath import packets as pk
    from propolis.maps import bpf
    import tempfile
    server = None
    if not nats_url:
        server = EmbeddedNats(tempfile.mkdtemp(prefix="bench-flows-nats-"))
        await asyncio.to_thread(server.start_sync)
        nats_url = server.url
    dp = Datapath(f"bench-flows-{os.getpid()}-{uuid.uuid4().hex[:6]}",
                  settings=DatapathSettings(monitor_aggregation="none"))
    results = []
    try:
        await dp.load()
        dp.upsert_endpoint(endpoint_id=_ENDPOINT, ip=_POD, identity=1000, ifindex=1,
                           ingress_enforced=False, egress_enforced=False)
        dp.set_ipcache([IPCacheEntry(_PEER, 99)])
        bpf.prog_test_run(dp.programs.to_container_fd, pk.tcp(_PEER, 40000, _POD, 443))  # conntrack entry
        runs = [(rate, False) for rate in rates] + ([(follow_rate, True)] if follow_rate else [])
        for rate, via_relay in runs:
            results.append(await _one_rate(dp, nats_url, rate, seconds, via_relay))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        await dp.remove_all()
        if server is not None:
            await asyncio.to_thread(server.stop_sync)
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["subscribe"]:
        asyncio.run(_subscriber(sys.argv[2]))
    elif sys.argv[1:2] == ["follow"]:
        asyncio.run(_relay_subscriber(sys.argv[2]))
