"""Reachability probes with real packets, sent from inside a pod's network namespace.

Why sockets instead of `ip netns exec nc`: a socket created while the calling
thread is switched into the pod namespace (setns) stays in that namespace, so
one asyncio loop in the root namespace can run thousands of probes from any
pods in parallel (far beyond the 200 probes/s `probe --all` needs) without a
process per probe.

TCP: connected = the handshake completed; the pod's echo server then names
itself (`answered_by`). UDP: connected = a reply came back (resent a few times
within the timeout); an ICMP port unreachable ends the probe early.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from propolis.connectivity.probe import PROBE_PAYLOAD  # the same payload the in-pod probe sends
from propolis.errors import ValidationError
from propolis_sandbox import cgroups
from propolis_sandbox import netns as netns_mod

PROTOCOLS = ("TCP", "UDP")


@dataclass(frozen=True)
class ProbeSpec:
    """One probe: from a pod (its namespace) to an address and port."""

    from_netns: str
    ip: str
    port: int
    protocol: str = "TCP"
    from_label: str = ""  # "ns/pod" for reports
    to_label: str = ""
    http: tuple[str, str] | None = None  # (method, path): send one HTTP/1.1 request instead of the payload
    headers: tuple[tuple[str, str], ...] = ()  # extra request headers with `http`
    grpc: str | None = None  # "/package.Service/Method": one unary gRPC call (HTTP/2) instead of the payload
    from_cgroup: str = ""  # FROM node:NAME: the node's cgroup v2, where the socket is made (socket LB applies)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValidationError("protocol", f"must be TCP or UDP, got {self.protocol!r}")
        if not 1 <= self.port <= 65535:
            raise ValidationError("port", f"must be 1..65535, got {self.port}")
        if self.grpc is not None and (self.protocol != "TCP" or self.http or not self.grpc.startswith("/")):
            raise ValidationError("grpc", f"a TCP call /package.Service/Method without --http, got {self.grpc!r}")


@dataclass
class ProbeResult:
    spec: ProbeSpec
    connected: bool
    answered_by: str = ""
    error: str = ""
    elapsed_s: float = 0.0
    http_status: int | None = None  # the response's status code (HTTP probes that got one)
    grpc_status: int | None = None  # the call's gRPC status code (gRPC probes that got an answer)

    def to_json(self) -> dict[str, Any]:
        """The `probe --all -o json` record: from, to, port, protocol, connected (+ detail)."""
        return {"from": self.spec.from_label or self.spec.from_netns, "to": self.spec.to_label or self.spec.ip,
                "port": self.spec.port, "protocol": self.spec.protocol, "connected": self.connected,
                "ip": self.spec.ip, "answeredBy": self.answered_by, "error": self.error,
                **({"http_status": self.http_status} if self.spec.http else {}),
                **({"http_status": self.http_status, "grpc_status": self.grpc_status} if self.spec.grpc else {})}


def http_request(spec: ProbeSpec) -> bytes:
    assert spec.http is not None
    method, path = spec.http
    extra = "".join(f"{k}: {v}\r\n" for k, v in spec.headers)
    return (f"{method} {path} HTTP/1.1\r\nHost: {spec.ip}:{spec.port}\r\n{extra}"
            f"Content-Length: 0\r\nConnection: close\r\n\r\n").encode("latin-1")


def http_status(data: bytes) -> int | None:
    """The status code of a response's first line, None if it is no HTTP response."""
    parts = data.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


def _parse_answer(data: bytes) -> str:
    first = data.split(b" ", 1)[0].split(b"\n", 1)[0]
    return first.decode(errors="replace")


def _probe_socket(spec: ProbeSpec, kind: int) -> socket.socket:
    """A socket of FROM: in its network namespace and, for a node, made inside the node's cgroup (a socket
    keeps the cgroup it was made in), as a process of the node would make it."""
    if not spec.from_cgroup:
        return netns_mod.socket_in(spec.from_netns, socket.AF_INET, kind)
    with cgroups.joined(spec.from_cgroup):
        return netns_mod.socket_in(spec.from_netns, socket.AF_INET, kind)


async def _probe_tcp(spec: ProbeSpec, timeout: float) -> ProbeResult:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    sock = _probe_socket(spec, socket.SOCK_STREAM)
    try:
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (spec.ip, spec.port)), timeout)
        except TimeoutError:
            return ProbeResult(spec, False, error="timeout", elapsed_s=time.monotonic() - started)
        except OSError as exc:
            return ProbeResult(spec, False, error=exc.strerror or str(exc), elapsed_s=time.monotonic() - started)
        if spec.grpc:
            return await _grpc_call(spec, sock, started, timeout)
        answered, status = "", None
        try:
            await loop.sock_sendall(sock, http_request(spec) if spec.http else PROBE_PAYLOAD)
            remaining = max(0.05, timeout - (time.monotonic() - started))
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), remaining)
            if spec.http:
                status = http_status(data)
            else:
                answered = _parse_answer(data) if data else ""
        except (OSError, TimeoutError):
            pass  # connected is about the handshake; the echo is a bonus
        return ProbeResult(spec, True, answered_by=answered, elapsed_s=time.monotonic() - started,
                           http_status=status)
    finally:
        sock.close()


async def _grpc_call(spec: ProbeSpec, sock: socket.socket, started: float, timeout: float) -> ProbeResult:
    """One unary call on the connected socket (`grpc_echo.unary_calls`)."""
    from propolis_sandbox import grpc_echo
    assert spec.grpc is not None
    http_status = grpc_status = None
    writer = None
    try:
        reader, writer = await asyncio.open_connection(sock=sock)
        remaining = max(0.05, timeout - (time.monotonic() - started))
        (result,) = await asyncio.wait_for(
            grpc_echo.unary_calls(reader, writer, f"{spec.ip}:{spec.port}", [(spec.grpc, b"propolis-probe")]),
            remaining)
        http_status, grpc_status = result.http_status, result.grpc_status
    except (OSError, TimeoutError):
        pass  # connected is about the handshake; the status is a bonus
    finally:
        if writer is not None:
            writer.close()
    return ProbeResult(spec, True, elapsed_s=time.monotonic() - started, http_status=http_status,
                       grpc_status=grpc_status)


async def _probe_udp(spec: ProbeSpec, timeout: float, attempts: int = 3) -> ProbeResult:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    sock = _probe_socket(spec, socket.SOCK_DGRAM)
    try:
        try:
            sock.connect((spec.ip, spec.port))
        except OSError as exc:
            return ProbeResult(spec, False, error=exc.strerror or str(exc))
        per_try = timeout / attempts
        for _ in range(attempts):
            try:
                sock.send(PROBE_PAYLOAD)
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), per_try)
                return ProbeResult(spec, True, answered_by=_parse_answer(data), elapsed_s=time.monotonic() - started)
            except TimeoutError:
                continue
            except OSError as exc:  # ICMP unreachable surfaces as ECONNREFUSED
                return ProbeResult(spec, False, error=exc.strerror or str(exc), elapsed_s=time.monotonic() - started)
        return ProbeResult(spec, False, error="timeout", elapsed_s=time.monotonic() - started)
    finally:
        sock.close()


async def probe(spec: ProbeSpec, *, timeout: float = 2.0) -> ProbeResult:
    """Run one probe; never raises for network outcomes (they are the result)."""
    if spec.protocol == "TCP":
        return await _probe_tcp(spec, timeout)
    return await _probe_udp(spec, timeout)


async def probe_all(specs: Iterable[ProbeSpec], *, timeout: float = 1.0, concurrency: int = 256) -> list[ProbeResult]:
    """Run probes in parallel (bounded), results in the order given."""
    gate = asyncio.Semaphore(concurrency)

    async def one(spec: ProbeSpec) -> ProbeResult:
        async with gate:
            return await probe(spec, timeout=timeout)

    return list(await asyncio.gather(*(one(s) for s in specs)))


@dataclass
class Matrix:
    """A truth table per (protocol, port), like the Kubernetes network-policy e2e output."""

    pods: list[str] = field(default_factory=list)
    cells: dict[tuple[str, int], dict[tuple[str, str], bool]] = field(default_factory=dict)

    @classmethod
    def from_results(cls, results: list[ProbeResult]) -> Matrix:
        matrix = cls()
        seen: dict[str, None] = {}
        for r in results:
            seen.setdefault(r.spec.from_label, None)
            seen.setdefault(r.spec.to_label, None)
            matrix.cells.setdefault((r.spec.protocol, r.spec.port), {})[(r.spec.from_label, r.spec.to_label)] = r.connected
        matrix.pods = list(seen)
        return matrix

    def render(self) -> str:
        """Rows are sources, columns destinations; `.` connected, `X` not, blank not probed."""
        out = []
        width = max([len(p) for p in self.pods] + [7])
        for (protocol, port), table in sorted(self.cells.items()):
            columns = [p for p in self.pods if any(to == p for (_, to) in table)]
            rows = [p for p in self.pods if any(fr == p for (fr, _) in table)]
            out.append(f"{protocol}/{port}:")
            out.append(" " * (width + 1) + " ".join(f"{i:>2}" for i in range(len(columns))))
            for row in rows:
                marks = []
                for col in columns:
                    value = table.get((row, col))
                    marks.append(" ." if value else (" X" if value is not None else "  "))
                out.append(f"{row:<{width}} " + " ".join(marks))
            out.append("  columns: " + ", ".join(f"{i}={c}" for i, c in enumerate(columns)))
            ok = sum(1 for v in table.values() if v)
            out.append(f"  {ok}/{len(table)} connected")
            out.append("")
        return "\n".join(out).rstrip() + "\n"


def results_json(results: list[ProbeResult]) -> list[dict[str, Any]]:
    return [r.to_json() for r in results]


def spec_dict(spec: ProbeSpec) -> dict[str, Any]:
    return asdict(spec)
