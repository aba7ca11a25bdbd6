"""The HTTP/1.1 L7 proxy: one transparent listener per (family, direction) proxy port.
A connection opening with the HTTP/2 preface (gRPC) is served by `l7.http2` instead, same rules.

Per accepted connection (the datapath redirected it, `l7.redirect`): the original destination is
the socket's local address. Every request is judged on its own when its head is complete, with
the rules `ProxyPolicy` gives for this connection at that moment (rules may change while a
connection lives). Allowed: forwarded to the original destination over one onward connection
(opened at the first allowed request, source = the client's address) and its response relayed,
bodies streamed piece by piece. Denied: `403 Access denied` (Envoy's answer), its body dropped,
the connection kept if the client keeps it. One request at a time goes onward, so responses
stay in request order for pipelining clients.

Bad input ends the connection with the protocol's answer: 400 (not HTTP, bad chunk sizes,
absurd lengths: llhttp's errors), 431 (header block over 60 KiB), 408 (head not complete within
`header_timeout`); the proxy itself never stops on a connection's error. Memory per connection
is bounded by one read (64 KiB) of parsed events.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from propolis.l7 import http, http2
from propolis.l7.flows import http_flow
from propolis.l7.policy import ProxyPolicy
from propolis.l7.redirect import transparent_listener, upstream_socket
from propolis.policy.proxy_ports import PROXY_PORTS

log = logging.getLogger("propolis.l7.proxy")

READ_SIZE = 65536
HOP_BY_HOP = ("connection", "keep-alive")


class ConnectionDone(Exception):
    """End this client connection (after the response already written)."""


@dataclass
class ProxyStats:
    connections: int = 0
    active: int = 0
    requests_forwarded: int = 0
    requests_denied: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


class ProxyListeners:
    """The node's transparent listeners of one protocol family (`PROXY_PORTS`): what the HTTP and the
    Kafka proxies share. A subclass names its FAMILY and serves each accepted connection in ``_serve``."""

    FAMILY = ""
    READ_LIMIT = READ_SIZE

    def __init__(self, policy: ProxyPolicy, *, node: str, make_socket: Callable[[], socket.socket],
                 on_flow: Callable[[dict[str, Any]], None] | None = None, idle_timeout: float = 300.0,
                 connect_timeout: float = 5.0) -> None:
        self.policy = policy
        self.node = node
        self.make_socket = make_socket  # a TCP socket in the node's network namespace
        self.on_flow = on_flow
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.servers: dict[int, asyncio.Server] = {}
        self.stats = ProxyStats()

    async def start(self) -> None:
        for (family, direction), port in PROXY_PORTS.items():
            if family != self.FAMILY:
                continue
            sock = transparent_listener(self.make_socket(), port)
            self.servers[port] = await asyncio.start_server(
                partial(self._serve, direction=direction, port=port), sock=sock, limit=self.READ_LIMIT)
            log.info("%s %s proxy listening on port %d", self.FAMILY, direction, port)

    async def stop(self) -> None:
        for server in self.servers.values():
            server.close()
        for server in self.servers.values():
            await server.wait_closed()
        self.servers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str,
                     port: int) -> None:
        raise NotImplementedError


class _Upstream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.stream = http.MessageStream(response=True)
        self.pending: list[tuple[str, Any]] = []

    def close(self) -> None:
        self.writer.close()


class HTTPProxy(ProxyListeners):
    FAMILY = "http"

    def __init__(self, policy: ProxyPolicy, *, node: str, make_socket: Callable[[], socket.socket],
                 on_flow: Callable[[dict[str, Any]], None] | None = None, header_timeout: float = 10.0,
                 idle_timeout: float = 300.0, connect_timeout: float = 5.0) -> None:
        super().__init__(policy, node=node, make_socket=make_socket, on_flow=on_flow, idle_timeout=idle_timeout,
                         connect_timeout=connect_timeout)
        self.header_timeout = header_timeout

    # --- one client connection ---------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str,
                     port: int) -> None:
        self.stats.connections += 1
        self.stats.active += 1
        client = writer.get_extra_info("peername")[:2]
        server = writer.get_extra_info("sockname")[:2]
        conn: _Connection | http2.Http2Connection | None = None
        try:
            # HTTP/1.1 or HTTP/2 (prior knowledge, h2c) on the same port, told by the preface as Envoy does
            first = await http2.read_preface(reader, self.idle_timeout)
            protocol = http2.Http2Connection if first == http2.PREFACE else _Connection
            conn = protocol(self, reader, writer, direction, port, client, server)
            await conn.run(first)
        except (TimeoutError, ConnectionDone, ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # noqa: BLE001 - one connection's failure never stops the proxy
            self.stats.error(type(exc).__name__)
            log.warning("connection %s:%d -> %s:%d ended: %s: %s", *client, *server, type(exc).__name__, exc)
        finally:
            self.stats.active -= 1
            if conn is not None:
                conn.close()
            writer.close()

    async def open_upstream(self, client: tuple[str, int], server: tuple[str, int],
                            direction: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Connect onward to the original destination as the client's address; None = no answer."""
        loop = asyncio.get_running_loop()
        sock = upstream_socket(self.make_socket(), client[0], direction)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, server), self.connect_timeout)
        except (OSError, TimeoutError):
            sock.close()
            return None
        return await asyncio.open_connection(sock=sock, limit=READ_SIZE)

    def flow(self, direction: str, client: tuple[str, int], server: tuple[str, int], request: http.Head,
             response: http.Head | None, verdict: str, latency_ns: int) -> None:
        """Publish one L7 flow (the request, or its response) for the node's Hubble observer."""
        if self.on_flow is None:
            return
        self.on_flow(http_flow(node=self.node, direction=direction, client=client, server=server,
                               client_identity=self.policy.identity_of(client[0]),
                               server_identity=self.policy.identity_of(server[0]), request=request,
                               response=response, verdict=verdict, latency_ns=latency_ns))


class _Connection:
    def __init__(self, proxy: HTTPProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 direction: str, port: int, client: tuple[str, int], server: tuple[str, int]) -> None:
        self.proxy, self.reader, self.writer = proxy, reader, writer
        self.direction, self.port, self.client, self.server = direction, port, client, server
        self.requests = http.MessageStream()
        self.upstream: _Upstream | None = None

    def close(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
        self.writer.close()

    async def _answer_and_close(self, status: int, reason: str, what: str) -> None:
        self.proxy.stats.error(what)
        self.writer.write(http.local_response(status, reason, b"", close=True))
        await self.writer.drain()
        raise ConnectionDone()

    async def _read(self) -> bytes:
        started = self.requests.head_started
        # a head must be complete within header_timeout of its first byte, however slowly it trickles
        timeout = self.proxy.idle_timeout if started is None else \
            max(0.0, self.proxy.header_timeout - (time.monotonic() - started))
        try:
            async with asyncio.timeout(timeout):  # no task per read, unlike wait_for
                return await self.reader.read(READ_SIZE)
        except TimeoutError:
            if started is not None:
                await self._answer_and_close(408, "Request Timeout", "header_timeout")
            raise ConnectionDone() from None

    async def run(self, first: bytes = b"") -> None:
        current: tuple[http.Head, bool, float] | None = None  # (request head, allowed, start time)
        while True:
            data, first = first or await self._read(), b""
            if not data:
                return
            try:
                events = self.requests.feed(data)
            except http.HeaderTooLarge:
                await self._answer_and_close(431, "Request Header Fields Too Large", "header_too_large")
                return
            except http.BadMessage:
                await self._answer_and_close(400, "Bad Request", "bad_request")
                return
            for kind, value in events:
                if kind == "head":
                    current = (value, await self._begin(value), time.monotonic())
                elif current is None:
                    continue
                elif kind == "body":
                    head, ok, _ = current
                    if ok and self.upstream is not None and value:
                        self.upstream.writer.write(http.body_bytes(head, value))
                        await self.upstream.writer.drain()
                elif kind == "end":
                    head, ok, started = current
                    current = None
                    await (self._finish_allowed(head, started) if ok else self._finish_denied(head))

    async def _begin(self, head: http.Head) -> bool:
        """Judge a request when its head is complete; start sending it onward when allowed."""
        verdict = self.proxy.policy.http_verdict(self.direction, self.port, self.client, self.server)
        ok = not head.upgrade and http.allowed(verdict.rules, head)
        self._flow(head, None, "FORWARDED" if ok else "DROPPED", verdict.endpoint_identity,
                   verdict.peer_identity, 0)
        if not ok:
            self.proxy.stats.requests_denied += 1
            return False
        self.proxy.stats.requests_forwarded += 1
        if self.upstream is None:
            self.upstream = await self._connect()
        self.upstream.writer.write(head.serialize())
        return True

    async def _connect(self) -> _Upstream:
        opened = await self.proxy.open_upstream(self.client, self.server, self.direction)
        if opened is None:
            await self._answer_and_close(503, "Service Unavailable", "upstream_connect")
        assert opened is not None
        return _Upstream(*opened)

    async def _finish_denied(self, head: http.Head) -> None:
        self.writer.write(http.denied_response(close=not head.keep_alive))
        await self.writer.drain()
        if not head.keep_alive:
            raise ConnectionDone()

    async def _finish_allowed(self, request: http.Head, started: float) -> None:
        up = self.upstream
        assert up is not None
        up.writer.write(http.end_bytes(request))
        await up.writer.drain()
        response: http.Head | None = None
        while True:
            if not up.pending:
                data = await up.reader.read(READ_SIZE)
                if not data:  # a response ending at close, or the server went away
                    if response is None:
                        await self._answer_and_close(503, "Service Unavailable", "upstream_closed")
                    await self.writer.drain()
                    raise ConnectionDone()
                try:
                    up.pending = up.stream.feed(data)
                except (http.BadMessage, http.HeaderTooLarge):
                    if response is None:
                        await self._answer_and_close(502, "Bad Gateway", "upstream_bad_response")
                    raise ConnectionDone() from None
                continue
            kind, value = up.pending.pop(0)
            if kind == "head":
                response = value
                # hop-by-hop: the client's connection lives as the client asked, whatever the server's does
                value.headers = [(k, v) for k, v in value.headers if k.lower() not in HOP_BY_HOP]
                if not request.keep_alive:
                    value.headers.append(("connection", "close"))
                self.writer.write(value.serialize())
                if request.method == "HEAD":  # no body follows; llhttp would wait for one
                    await self.writer.drain()
                    up.close()
                    self.upstream = None
                    break
            elif kind == "body":
                self.writer.write(http.body_bytes(response, value) if response else value)
                await self.writer.drain()
            elif kind == "end" and response is not None and response.status >= 200:
                self.writer.write(http.end_bytes(response))
                await self.writer.drain()
                break
            elif kind == "end":  # 1xx: informational, the final response follows
                response = None
        assert response is not None
        self._flow(request, response, "FORWARDED", 0, 0, int((time.monotonic() - started) * 1e9))
        if not response.keep_alive and self.upstream is not None:
            self.upstream.close()  # the next allowed request opens a new onward connection
            self.upstream = None
        if not request.keep_alive:
            raise ConnectionDone()

    def _flow(self, request: http.Head, response: http.Head | None, verdict: str, endpoint_identity: int,
              peer_identity: int, latency_ns: int) -> None:
        self.proxy.flow(self.direction, self.client, self.server, request, response, verdict, latency_ns)
