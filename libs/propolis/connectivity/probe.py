"""The probe program run inside a client pod (`kubectl exec … python3 -c <this file> <json>`), stdlib only.

Why a program sent with the command and not an image: any image with python3 can run it, nothing is
built or pulled for the test. It takes a JSON list of probes (ip, port, protocol, http, timeout), runs
them in parallel from the pod's own network namespace and prints one JSON list of results, in order:
TCP connected = the handshake completed (the echo pod then names itself: ``answered_by``), UDP connected
= an answer came back (resent a few times; ICMP unreachable ends it early). Same rules as the sandbox's
in-process probes (`propolis_sandbox.probe`), which send the same payload.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from typing import Any

PROBE_PAYLOAD = b"propolis-probe\n"
UDP_ATTEMPTS = 3


def _answer(data: bytes) -> str:
    return data.split(b" ", 1)[0].split(b"\n", 1)[0].decode(errors="replace")


def _why(exc: OSError) -> str:
    """The errno's words ("Connection refused"): asyncio's connect errors carry its own text instead."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _http_status(data: bytes) -> int | None:
    parts = data.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


async def _tcp(ip: str, port: int, http: list[str] | None, timeout: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (ip, port)), timeout)
        except TimeoutError:
            return {"connected": False, "error": "timeout"}
        except OSError as exc:
            return {"connected": False, "error": _why(exc)}
        request = (f"{http[0]} {http[1]} HTTP/1.1\r\nHost: {ip}:{port}\r\nContent-Length: 0\r\n"
                   f"Connection: close\r\n\r\n").encode("latin-1") if http else PROBE_PAYLOAD
        result: dict[str, Any] = {"connected": True}
        try:
            await loop.sock_sendall(sock, request)
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), max(0.05, timeout - (time.monotonic() - started)))
            if http:
                result["http_status"] = _http_status(data)
            elif data:
                result["answered_by"] = _answer(data)
        except (OSError, TimeoutError):
            pass  # connected is about the handshake; the answer is a bonus
        return result
    finally:
        sock.close()


async def _udp(ip: str, port: int, timeout: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        try:
            sock.connect((ip, port))
        except OSError as exc:
            return {"connected": False, "error": _why(exc)}
        for _ in range(UDP_ATTEMPTS):
            try:
                sock.send(PROBE_PAYLOAD)
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout / UDP_ATTEMPTS)
                return {"connected": True, "answered_by": _answer(data)}
            except TimeoutError:
                continue
            except OSError as exc:  # ICMP unreachable surfaces as ECONNREFUSED
                return {"connected": False, "error": _why(exc)}
        return {"connected": False, "error": "timeout"}
    finally:
        sock.close()


async def run(probes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async def one(p: dict[str, Any]) -> dict[str, Any]:
        if p.get("protocol", "TCP") == "UDP":
            return await _udp(p["ip"], int(p["port"]), float(p["timeout"]))
        return await _tcp(p["ip"], int(p["port"]), p.get("http"), float(p["timeout"]))

    return list(await asyncio.gather(*(one(p) for p in probes)))


def main(argv: list[str]) -> int:
    print(json.dumps(asyncio.run(run(json.loads(argv[1])))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
