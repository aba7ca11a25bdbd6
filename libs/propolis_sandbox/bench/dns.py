"""`propolis bench dns`: the DNS proxy's added latency and its queries/s, against the same upstream queried directly.

Three processes on loopback, so the load generator does not share a core's event loop with what it
measures: the world's authoritative DNS (`world_dns.py`), the proxy (`DnsProxy` behind a UDP
listener, every query allowed by a `*` rule and every answer learned by a no-op hook, the path a
redirected query takes minus the kernel redirect), and this client. Same run, same upstream:
direct first, then through the proxy, at a paced rate (latency) and closed-loop (throughput).
Not measured here (not wired yet): the upstream answer -> ipcache row time, drops after resolution.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, cast

import dns.message

from propolis.fqdn.proxy import DnsProxy, Learned, Redirected
from propolis.model.matchpattern import FqdnSelector

NAMES = ("s3.amazonaws.com", "api.stripe.com", "example.org", "rotating.example.net")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _serve_proxy(port: int, upstream_port: int) -> None:
    """The proxy process: one UDP listener, one upstream socket per query (as the redirected path has)."""
    loop = asyncio.get_running_loop()

    async def exchange(wire: bytes, where: Redirected) -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            await loop.sock_sendto(sock, wire, (where.server_ip, where.server_port))
            return await asyncio.wait_for(loop.sock_recv(sock, 65535), 2)

    async def learn(item: Learned) -> None:
        return None

    every = [FqdnSelector(match_pattern="*")]
    proxy = DnsProxy(lambda where: every, exchange, learn, lambda: every)

    class Listener(asyncio.DatagramProtocol):
        transport: asyncio.DatagramTransport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # asyncio's selector datagram transport has DatagramTransport's methods without subclassing it
            self.transport = cast(asyncio.DatagramTransport, transport)

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            asyncio.ensure_future(self.reply(data, addr))

        async def reply(self, data: bytes, addr: tuple[str, int]) -> None:
            out = await proxy.handle(data, Redirected(addr[0], "127.0.0.1", upstream_port))
            if out is not None and self.transport is not None:
                self.transport.sendto(out, addr)

    await loop.create_datagram_endpoint(Listener, local_addr=("127.0.0.1", port))
    print("ready", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


class _Client(asyncio.DatagramProtocol):
    """One socket, answers matched to queries by id."""

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future[float]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        fut = self.waiting.pop(int.from_bytes(data[:2], "big"), None)
        if fut is not None and not fut.done():
            fut.set_result(time.perf_counter())


async def _query_loop(port: int, *, count: int, rate: float, concurrency: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(_Client, remote_addr=("127.0.0.1", port))
    wires = [dns.message.make_query(n, "A").to_wire() for n in NAMES]
    latencies: list[float] = []
    lost = 0
    gate = asyncio.Semaphore(concurrency)
    next_id = 0

    async def one(i: int) -> None:
        nonlocal lost
        async with gate:
            qid = i % 65536
            wire = qid.to_bytes(2, "big") + wires[i % len(wires)][2:]
            fut = loop.create_future()
            client.waiting[qid] = fut
            sent = time.perf_counter()
            transport.sendto(wire)
            try:
                latencies.append(await asyncio.wait_for(fut, 2) - sent)
            except TimeoutError:
                client.waiting.pop(qid, None)
                lost += 1

    started = time.perf_counter()
    tasks = []
    for i in range(count):
        if rate:
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(next_id)))
        next_id += 1
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    transport.close()
    latencies.sort()

    def pct(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 3) if latencies else None
    return {"queries": count, "lost": lost, "qps": round(len(latencies) / elapsed), "p50_ms": pct(0.5),
            "p99_ms": pct(0.99), "mean_ms": round(statistics.fmean(latencies) * 1000, 3) if latencies else None}


def _start(argv: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"{argv} did not start")
    return proc


async def run(rate: int = 1000, seconds: float = 3.0, concurrency: int = 64) -> dict[str, Any]:
    upstream_port, proxy_port = _free_port(), _free_port()
    procs = [_start([sys.executable, "-m", "propolis_sandbox.world_dns", "--listen", "127.0.0.1",
                     "--port", str(upstream_port)])]
    try:
        procs.append(_start([sys.executable, "-m", "propolis_sandbox.bench.dns", "--serve-proxy", str(proxy_port),
                             "--upstream-port", str(upstream_port)]))
        count = int(rate * seconds)
        figures: dict[str, Any] = {"rate": rate, "seconds": seconds}
        for label, port in (("direct", upstream_port), ("proxy", proxy_port)):
            await _query_loop(port, count=200, rate=0, concurrency=8)  # warm-up
            figures[f"{label}_paced"] = await _query_loop(port, count=count, rate=rate, concurrency=10_000)
            figures[f"{label}_closed_loop"] = await _query_loop(port, count=count * 2, rate=0, concurrency=concurrency)
        d, p = figures["direct_paced"], figures["proxy_paced"]
        if d["p50_ms"] is not None and p["p50_ms"] is not None:
            figures["added_p50_ms"] = round(p["p50_ms"] - d["p50_ms"], 3)
            figures["added_p99_ms"] = round(p["p99_ms"] - d["p99_ms"], 3)
        figures["not_measured"] = ("answer -> ipcache row and drops after resolution: this run has no sandbox "
                                   "(the dns-proxy waits for its writer's fqdn_generation, ~40 ms idle here)")
        return figures
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the bench's proxy process (internal)")
    parser.add_argument("--serve-proxy", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(_serve_proxy(args.serve_proxy, args.upstream_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
