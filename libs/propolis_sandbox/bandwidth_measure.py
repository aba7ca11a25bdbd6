"""Measure the TCP goodput between two network namespaces: a bounded transfer, counted at the receiver.

Why at the receiver and in a window after a warm-up: a shaper lets its first burst through at line
rate (its bucket starts full), so the steady rate is what arrives between `warmup` and
`warmup + seconds` after the first byte. The transfer ends there (connections reset), so what the
senders still had buffered costs no time. Used by the Bandwidth Manager's integration test and
`propolis bench node`.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from dataclasses import dataclass

from propolis.errors import TemporaryError
from propolis_sandbox import netns as netns_mod

CHUNK = 64 * 1024


@dataclass(frozen=True)
class RateSample:
    """What arrived in the measurement window, as bits per second."""

    streams: int
    window_bytes: int
    seconds: float
    bits_per_second: float


async def measure_tcp_rate(*, client_netns: str, server_netns: str, server_ip: str, streams: int = 1,
                           seconds: float = 3.0, warmup: float = 0.5) -> RateSample:
    """Send from `client_netns` to a listener in `server_netns` on `server_ip` over `streams` TCP
    connections; the rate counts the bytes that arrived in the `seconds` after the first `warmup`."""
    loop = asyncio.get_running_loop()
    listener = netns_mod.socket_in(server_netns, socket.AF_INET, socket.SOCK_STREAM)
    sockets: list[socket.socket] = [listener]
    window_bytes = 0
    started = asyncio.Event()
    window: list[float] = []  # [start, end] once the first byte arrived

    async def receive(conn: socket.socket) -> None:
        nonlocal window_bytes
        while True:
            data = await loop.sock_recv(conn, CHUNK)
            now = time.monotonic()
            if not started.is_set():
                window.extend([now + warmup, now + warmup + seconds])
                started.set()
            if not data:
                return
            if window[0] <= now < window[1]:
                window_bytes += len(data)

    async def send(sock: socket.socket) -> None:
        payload = b"\0" * CHUNK
        while True:
            await loop.sock_sendall(sock, payload)

    try:
        listener.bind((server_ip, 0))
        listener.listen(streams)
        port = listener.getsockname()[1]
        clients = []
        for _ in range(streams):
            sock = netns_mod.socket_in(client_netns, socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            # closed with a reset: what is still buffered is dropped, not sent at the shaped rate
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await asyncio.wait_for(loop.sock_connect(sock, (server_ip, port)), 5)
            clients.append(sock)
        accepted = []
        for _ in range(streams):
            conn = (await asyncio.wait_for(loop.sock_accept(listener), 5))[0]
            sockets.append(conn)
            accepted.append(conn)
        tasks = [asyncio.ensure_future(send(s)) for s in clients] + \
                [asyncio.ensure_future(receive(c)) for c in accepted]
        try:
            await asyncio.wait_for(started.wait(), 10)
            await asyncio.sleep(window[1] - time.monotonic())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for sock in sockets:
            sock.close()
    if not window_bytes:
        raise TemporaryError(f"measure {client_netns} -> {server_ip}: nothing arrived after the {warmup}s warm-up")
    return RateSample(streams=streams, window_bytes=window_bytes, seconds=seconds,
                      bits_per_second=window_bytes * 8 / seconds)
