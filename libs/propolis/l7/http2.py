"""HTTP/2 (gRPC) in the L7 proxy: prior knowledge and h2c, stream by stream, with `h2`.

A redirected connection whose first bytes are the HTTP/2 connection preface (`read_preface`; as
Envoy's codec "AUTO" tells HTTP/1.1 from HTTP/2) is served here instead of by the HTTP/1.1 path.
The rules are the same port rule's `http` rules, so a gRPC rule is written as Cilium writes it:
`method: POST`, `path: /package.Service/Method` (anchored full match on `:path`), `host` on
`:authority`, `headers` on the request's headers.

Each stream is judged on its own when its headers arrive. Allowed: sent on over ONE upstream
HTTP/2 connection per client connection (opened at the first allowed stream, as the client's
address), data relayed both ways within each side's flow-control windows: a side's data is
acknowledged (its window reopened) only once sent on, so what the proxy buffers per connection and
direction is bounded by one window. Denied: `:status 403` with `Access denied` (gRPC clients read it
as PERMISSION_DENIED), the connection stays up for the other streams.

Limits (Envoy's spirit): 100 concurrent streams, 60 KiB header lists, 64 KiB windows; a frame
flood (control frames with no work in between, streams reset as fast as opened) or a malformed
frame ends the connection with GOAWAY; one connection's error never stops the proxy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from propolis.l7 import http

if TYPE_CHECKING:
    from propolis.l7.proxy import HTTPProxy

log = logging.getLogger("propolis.l7.http2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
READ_SIZE = 65536
MAX_CONCURRENT_STREAMS = 100
MAX_HEADER_LIST_SIZE = http.MAX_HEADER_BYTES
#: control frames (PING, SETTINGS, RST_STREAM, PRIORITY, WINDOW_UPDATE, empty DATA, unknown) a client
#: may send beyond `CONTROL_FRAMES_PER_WORK` per piece of work (a request, a data frame either way)
CONTROL_FRAME_ALLOWANCE = 1000
CONTROL_FRAMES_PER_WORK = 10
#: streams the client resets before their response: tolerated up to this many, then only up to half
#: of the streams it opened (the HTTP/2 "rapid reset" attack, CVE-2023-44487)
PREMATURE_RESET_ALLOWANCE = 100

_CONTROL_EVENTS = (h2.events.PingReceived, h2.events.RemoteSettingsChanged, h2.events.PriorityUpdated,
                   h2.events.WindowUpdated, h2.events.UnknownFrameReceived, h2.events.StreamReset)


class Flood(Exception):
    """The client sends frames faster than it gives the proxy work (ENHANCE_YOUR_CALM)."""


async def read_preface(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """The connection's first bytes: the whole HTTP/2 preface, or fewer bytes as soon as they differ
    from it (then it is HTTP/1.x and these bytes are its start). b"" = closed before a byte."""
    got = b""
    while len(got) < len(PREFACE) and PREFACE.startswith(got):
        chunk = await asyncio.wait_for(reader.read(len(PREFACE) - len(got)), timeout)
        if not chunk:
            break
        got += chunk
    return got


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def request_head(headers: list[tuple[bytes, bytes]]) -> http.Head:
    """An HTTP/2 request's headers as the Head the HTTP rules judge (`:authority` is the host)."""
    head = http.Head(version="2")
    for name, value in headers:
        key, text = _text(name), _text(value)
        if key == ":method":
            head.method = text
        elif key == ":path":
            head.url = text
        elif key == ":authority":
            head.headers.insert(0, ("host", text))
        elif not key.startswith(":"):
            head.headers.append((key, text))
    return head


def response_head(headers: list[tuple[bytes, bytes]]) -> http.Head:
    head = http.Head(version="2")
    for name, value in headers:
        key, text = _text(name), _text(value)
        if key == ":status":
            head.status = int(text) if text.isdigit() else 0
        elif not key.startswith(":"):
            head.headers.append((key, text))
    return head


def _config(*, client_side: bool) -> h2.config.H2Configuration:
    return h2.config.H2Configuration(client_side=client_side, header_encoding=None, validate_inbound_headers=True)


def _connection(*, client_side: bool) -> h2.connection.H2Connection:
    """One end the proxy holds (client_side = towards the upstream server), with the proxy's limits."""
    conn = h2.connection.H2Connection(_config(client_side=client_side))
    conn.local_settings = h2.settings.Settings(client=client_side, initial_values={
        SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
        SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
        SettingCodes.ENABLE_PUSH: 0})
    conn.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE  # before the peer acknowledges it too
    conn.initiate_connection()
    return conn


@dataclass
class _Outbound:
    """What waits for one side's flow-control window on one stream."""

    data: bytearray = field(default_factory=bytearray)
    end: bool = False
    trailers: list[tuple[bytes, bytes]] | None = None
    ack: Any = None  # callable(n): reopen the window of the side the data came from


@dataclass
class _Stream:
    """One client stream: its verdict, its upstream stream, what the flows need."""

    client_id: int
    request: http.Head
    allowed: bool
    started: float
    upstream_id: int = 0
    response: http.Head | None = None


class _Side:
    """One HTTP/2 connection the proxy holds: to the client or to the upstream server."""

    def __init__(self, conn: h2.connection.H2Connection, writer: asyncio.StreamWriter) -> None:
        self.conn, self.writer = conn, writer
        self.outbound: dict[int, _Outbound] = {}

    def out(self, stream_id: int) -> _Outbound:
        return self.outbound.setdefault(stream_id, _Outbound())

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def pump(self) -> int:
        """Send what the windows allow; returns the data frames sent."""
        frames = 0
        for stream_id, out in list(self.outbound.items()):
            try:
                while out.data:
                    size = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
                    if size <= 0:
                        break
                    chunk = bytes(out.data[:size])
                    del out.data[:size]
                    self.conn.send_data(stream_id, chunk)
                    frames += 1
                    if out.ack is not None:
                        out.ack(len(chunk))
                if not out.data and out.end:
                    if out.trailers is not None:
                        self.conn.send_headers(stream_id, out.trailers, end_stream=True)
                    else:
                        self.conn.end_stream(stream_id)
                    del self.outbound[stream_id]
            except h2.exceptions.NoSuchStreamError:  # reset meanwhile: nothing more to send on it
                self.outbound.pop(stream_id, None)
        return frames


def _acknowledger(conn: h2.connection.H2Connection, stream_id: int) -> Any:
    def ack(n: int) -> None:
        conn.acknowledge_received_data(n, stream_id)
    return ack


class Http2Connection:
    """One client connection speaking HTTP/2 (same shape as the HTTP/1.1 `_Connection`)."""

    def __init__(self, proxy: HTTPProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 direction: str, port: int, client: tuple[str, int], server: tuple[str, int]) -> None:
        self.proxy, self.reader = proxy, reader
        self.direction, self.port, self.client, self.server = direction, port, client, server
        self.down = _Side(_connection(client_side=False), writer)
        self.up: _Side | None = None
        self.up_task: asyncio.Task[None] | None = None
        self.streams: dict[int, _Stream] = {}
        self.by_upstream: dict[int, _Stream] = {}
        self.control_frames = 0
        self.work = 0
        self.opened = 0
        self.premature_resets = 0
        self.connecting: asyncio.Lock = asyncio.Lock()

    def close(self) -> None:
        if self.up_task is not None:
            self.up_task.cancel()
        if self.up is not None:
            self.up.writer.close()
        self.down.writer.close()

    async def run(self, first: bytes) -> None:
        data = first
        while data:
            try:
                events = self.down.conn.receive_data(data)
                for event in events:
                    await self._client_event(event)
                self._check_flood()
            except h2.exceptions.ProtocolError as exc:  # h2 queued the GOAWAY naming the error
                self.proxy.stats.error("h2_protocol_error")
                log.debug("HTTP/2 connection %s:%d ended: %s", *self.client, exc)
                return await self._flush_and_end()
            except Flood:
                self.proxy.stats.error("h2_flood")
                self.down.conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
                return await self._flush_and_end()
            await self._flush()
            try:
                async with asyncio.timeout(self.proxy.idle_timeout):  # no task per read, unlike wait_for
                    data = await self.reader.read(READ_SIZE)
            except TimeoutError:
                self.down.conn.close_connection(ErrorCodes.NO_ERROR)
                return await self._flush_and_end()

    async def _flush_and_end(self) -> None:
        self.down.flush()
        await self.down.writer.drain()

    async def _flush(self) -> None:
        """Write what both connections queued; wait while the client reads slower than it asks."""
        up = self.up
        if up is not None:
            up.flush()
        self.down.flush()
        await self.down.writer.drain()
        if up is not None:
            try:
                await up.writer.drain()
            except ConnectionError:
                pass  # the upstream reader notices and resets its streams

    def _check_flood(self) -> None:
        if self.control_frames > CONTROL_FRAME_ALLOWANCE + CONTROL_FRAMES_PER_WORK * self.work:
            raise Flood("control frames")
        if self.premature_resets > PREMATURE_RESET_ALLOWANCE and 2 * self.premature_resets > self.opened:
            raise Flood("streams reset before their response")

    # --- the client's side --------------------------------------------------------------------
    async def _client_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            await self._request(event.stream_id, event.headers, event.stream_ended is not None)
            return
        if isinstance(event, _CONTROL_EVENTS) or (isinstance(event, h2.events.DataReceived) and not event.data):
            self.control_frames += 1
        if isinstance(event, h2.events.DataReceived):
            self._client_data(event)
        elif isinstance(event, h2.events.TrailersReceived):
            self._to_upstream(event.stream_id, trailers=event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            self._to_upstream(event.stream_id, end=True)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            self.down.outbound.pop(event.stream_id, None)
            if stream is not None:
                self.premature_resets += 1
                self._cancel_upstream(stream)
        elif isinstance(event, h2.events.WindowUpdated):
            self.work += self.down.pump()

    async def _request(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        self.opened += 1
        self.work += 1
        head = request_head(headers)
        verdict = self.proxy.policy.http_verdict(self.direction, self.port, self.client, self.server)
        ok = http.allowed(verdict.rules, head)
        stream = _Stream(stream_id, head, ok, time.monotonic())
        self.proxy.flow(self.direction, self.client, self.server, head, None, "FORWARDED" if ok else "DROPPED", 0)
        if not ok:
            self.proxy.stats.requests_denied += 1
            self._answer(stream_id, 403, http.ACCESS_DENIED)
            return
        self.proxy.stats.requests_forwarded += 1
        up = await self._upstream()
        if up is None:
            self._answer(stream_id, 503, b"upstream connect error\r\n")
            return
        stream.upstream_id = up.conn.get_next_available_stream_id()
        self.streams[stream_id] = stream
        self.by_upstream[stream.upstream_id] = stream
        try:
            up.conn.send_headers(stream.upstream_id, headers, end_stream=ended)
        except h2.exceptions.ProtocolError:  # the server's limits (its concurrent streams) refuse it
            self._forget(stream)
            self.down.conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)

    def _answer(self, stream_id: int, status: int, body: bytes) -> None:
        """A response the proxy itself gives (Envoy's shape), the client's further data discarded."""
        self.down.conn.send_headers(stream_id, [(b":status", str(status).encode()), (b"content-type", b"text/plain"),
                                                (b"content-length", str(len(body)).encode()),
                                                (b"server", b"envoy")])
        self.down.conn.send_data(stream_id, body, end_stream=True)

    def _client_data(self, event: h2.events.DataReceived) -> None:
        padding = event.flow_controlled_length - len(event.data)
        if padding:
            self.down.conn.acknowledge_received_data(padding, event.stream_id)
        stream = self.streams.get(event.stream_id)
        if stream is None or self.up is None:  # denied or gone: discarded, its window reopened
            if event.data:
                self.down.conn.acknowledge_received_data(len(event.data), event.stream_id)
            return
        self.work += 1
        out = self.up.out(stream.upstream_id)
        out.ack = _acknowledger(self.down.conn, event.stream_id)
        out.data += event.data
        self.up.pump()

    def _to_upstream(self, stream_id: int, *, end: bool = False,
                     trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or self.up is None:
            return
        out = self.up.out(stream.upstream_id)
        if trailers is not None:
            out.trailers = trailers
        out.end = True  # trailers end the request too (StreamEnded follows them)
        self.up.pump()

    def _cancel_upstream(self, stream: _Stream) -> None:
        self.by_upstream.pop(stream.upstream_id, None)
        if self.up is not None:
            self.up.outbound.pop(stream.upstream_id, None)
            try:
                self.up.conn.reset_stream(stream.upstream_id, ErrorCodes.CANCEL)
            except h2.exceptions.ProtocolError:
                pass  # already closed upstream

    def _forget(self, stream: _Stream) -> None:
        self.streams.pop(stream.client_id, None)
        self.by_upstream.pop(stream.upstream_id, None)

    # --- the upstream side --------------------------------------------------------------------
    async def _upstream(self) -> _Side | None:
        async with self.connecting:
            if self.up is None:
                opened = await self.proxy.open_upstream(self.client, self.server, self.direction)
                if opened is None:
                    return None
                reader, writer = opened
                self.up = _Side(_connection(client_side=True), writer)
                self.up_task = asyncio.ensure_future(self._read_upstream(self.up, reader))
        return self.up

    async def _read_upstream(self, up: _Side, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                for event in up.conn.receive_data(data):
                    self._upstream_event(up, event)
                await self._flush()
        except (h2.exceptions.ProtocolError, ConnectionError) as exc:
            self.proxy.stats.error("upstream_h2_error")
            log.debug("upstream HTTP/2 %s:%d failed: %s", *self.server, exc)
        except Exception as exc:  # noqa: BLE001 - one connection's failure never stops the proxy
            self.proxy.stats.error(type(exc).__name__)
            log.warning("upstream HTTP/2 %s:%d ended: %s: %s", *self.server, type(exc).__name__, exc)
        self._upstream_gone(up, last_stream_id=None)
        try:
            await self._flush()
        except ConnectionError:
            pass

    def _upstream_event(self, up: _Side, event: h2.events.Event) -> None:
        stream = self.by_upstream.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ConnectionTerminated):
            self._upstream_gone(up, last_stream_id=event.last_stream_id or 0)
        elif isinstance(event, h2.events.WindowUpdated):
            up.pump()
        elif stream is None:
            return
        elif isinstance(event, (h2.events.ResponseReceived, h2.events.InformationalResponseReceived)):
            ended = isinstance(event, h2.events.ResponseReceived) and event.stream_ended is not None
            if isinstance(event, h2.events.ResponseReceived):
                stream.response = response_head(event.headers)
            self._send_down(stream, lambda: self.down.conn.send_headers(stream.client_id, event.headers,
                                                                        end_stream=ended))
            if ended:
                self._response_done(stream)
        elif isinstance(event, h2.events.DataReceived):
            padding = event.flow_controlled_length - len(event.data)
            if padding:
                up.conn.acknowledge_received_data(padding, event.stream_id)
            out = self.down.out(stream.client_id)
            out.ack = _acknowledger(up.conn, event.stream_id)
            out.data += event.data
            self.work += self.down.pump()
        elif isinstance(event, (h2.events.TrailersReceived, h2.events.StreamEnded)):
            if stream.client_id not in self.streams:
                return
            out = self.down.out(stream.client_id)
            if isinstance(event, h2.events.TrailersReceived):
                out.trailers = event.headers
                if stream.response is not None:  # grpc-status / grpc-message for the flow
                    stream.response.headers += response_head(event.headers).headers
            out.end = True
            self._send_down(stream, self.down.pump)
            self._response_done(stream)
        elif isinstance(event, h2.events.StreamReset):
            self._forget(stream)
            self.down.outbound.pop(stream.client_id, None)
            self._send_down(stream, lambda: self.down.conn.reset_stream(stream.client_id, event.error_code))

    def _send_down(self, stream: _Stream, send: Any) -> None:
        """Relay to the client; what the client's connection refuses (bad headers) resets the stream."""
        try:
            send()
        except h2.exceptions.NoSuchStreamError:
            self._forget(stream)
        except h2.exceptions.ProtocolError:
            self.proxy.stats.error("upstream_bad_response")
            self._forget(stream)
            self._cancel_upstream(stream)
            self.down.conn.reset_stream(stream.client_id, ErrorCodes.INTERNAL_ERROR)

    def _response_done(self, stream: _Stream) -> None:
        if self.streams.pop(stream.client_id, None) is None:
            return
        self.by_upstream.pop(stream.upstream_id, None)
        self.proxy.flow(self.direction, self.client, self.server, stream.request,
                        stream.response or http.Head(version="2"), "FORWARDED",
                        int((time.monotonic() - stream.started) * 1e9))

    def _upstream_gone(self, up: _Side | None, *, last_stream_id: int | None) -> None:
        """The server sent GOAWAY (`last_stream_id`: it finishes the streams up to that one) or its
        connection ended (None). Streams it never saw are refused (REFUSED_STREAM: safe to retry),
        lost ones get 503 before their response began (UNAVAILABLE for gRPC), a reset after;
        once no stream is left on it the next allowed stream opens a new connection."""
        if up is None or up is not self.up:
            return
        for stream in list(self.streams.values()):
            if last_stream_id is not None and stream.upstream_id <= last_stream_id:
                continue
            self._forget(stream)
            self.down.outbound.pop(stream.client_id, None)
            if last_stream_id is not None:
                self._send_down(stream, lambda s=stream: self.down.conn.reset_stream(s.client_id,
                                                                                       ErrorCodes.REFUSED_STREAM))
            elif stream.response is None:
                self._send_down(stream, lambda s=stream: self._answer(s.client_id, 503, b"upstream reset\r\n"))
            else:
                self._send_down(stream, lambda s=stream: self.down.conn.reset_stream(s.client_id,
                                                                                       ErrorCodes.INTERNAL_ERROR))
        if last_stream_id is None or not self.streams:
            self.up = None
            up.writer.close()
