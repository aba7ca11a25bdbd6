"""Helpers of the encryption tests: pod TCP streams, key manager state (the capture is the library's)."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

from propolis.bus.connection import Bus
from propolis.encryption.backend import LISTEN_PORT as WG_PORT  # noqa: F401 - re-exported for the tests
from propolis.encryption.capture import UnderlayCapture as Capture  # noqa: F401 - the tests' name for it
from propolis.runtime.heartbeats import newest, read_heartbeats
from propolis_sandbox import cluster
from propolis_sandbox.config import SandboxState
from propolis_sandbox.netns import socket_in


class PodStream:
    """A long-lived TCP connection from a pod to an echo server: each line comes back as `ns/pod line`."""

    def __init__(self, state: SandboxState, source: str, ip: str, port: int = 8080) -> None:
        ns, name = source.split("/")
        self.netns = state.sandbox().pod_netns(ns, name)
        self.addr = (ip, port)
        self.sock: socket.socket | None = None
        self.buf = b""

    async def connect(self, timeout: float = 2.0) -> None:
        self.sock = socket_in(self.netns, socket.AF_INET, socket.SOCK_STREAM)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(self.sock, self.addr), timeout)

    async def echo(self, line: bytes, timeout: float = 2.0) -> bytes:
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, line + b"\n")
        while b"\n" not in self.buf:
            chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout)
            if not chunk:
                raise ConnectionResetError("stream closed by the peer")
            self.buf += chunk
        answer, self.buf = self.buf.split(b"\n", 1)
        return answer

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


async def connect_with_retry(state: SandboxState, source: str, ip: str, *, deadline_s: float = 15.0) -> PodStream:
    """The first packet to a peer starts the WireGuard handshake: retry until it went through."""
    end = time.monotonic() + deadline_s
    while True:
        stream = PodStream(state, source, ip)
        try:
            await stream.connect(timeout=1.0)
            await stream.echo(b"hello", timeout=2.0)
            return stream
        except (TimeoutError, OSError):
            stream.close()
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.2)


async def can_connect(state: SandboxState, source: str, ip: str, timeout: float = 1.5) -> bool:
    stream = PodStream(state, source, ip)
    try:
        await stream.connect(timeout=timeout)
        await stream.echo(b"probe", timeout=timeout)
        return True
    except (TimeoutError, OSError):
        return False
    finally:
        stream.close()


async def pod_ip(state: SandboxState, target: str) -> str:
    pod = await cluster.get(state, "pods", target)
    return str(pod["status"]["podIP"])


def admin_bus(state: SandboxState, name: str) -> Bus:
    make = getattr(state, "admin_bus", None)
    return make(name) if make else Bus(state.nats_url, name=name)


async def keymgr_progress(bus: Bus, node: str) -> dict[str, Any]:
    hb = newest(await read_heartbeats(bus), "wireguard-keymgr", node)
    return dict(hb.progress.get("wireguard", {})) if hb else {}


def keymgr_state_dir(state: SandboxState, node: str) -> Path:
    return state.sandbox().run_dir / node / "wireguard"


def service_pid(state: SandboxState, name: str, node: str) -> int:
    from propolis_sandbox.config import load_state
    fresh = load_state(state.sandbox().name)
    assert fresh is not None
    return next(int(s["pid"]) for s in fresh.services if s["name"] == name and s["node"] == node)
