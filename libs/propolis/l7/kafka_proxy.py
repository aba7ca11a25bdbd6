"""The Kafka L7 proxy: one transparent listener per direction (`PROXY_PORTS[("kafka", direction)]`).

Per redirected connection, each request frame is judged on its own (`kafka.allowed`) with the rules
`ProxyPolicy.verdict("kafka", …)` gives at that moment. Allowed: forwarded as received over one onward
connection to the original destination (opened at the first allowed request, source = the client's address),
its response relayed as it streams in. Denied: the proxy answers itself (`kafka.denied_response`: the API's
response with TOPIC_AUTHORIZATION_FAILED and the request's correlation id) and the connection stays up.
Kafka clients expect responses in request order, so an answer to a denied request waits behind the
responses still due from the broker (`_Pending`). The broker's ApiVersions answer is relayed without the
versions whose requests name topics by id (`kafka.cap_api_versions`): clients then send topic names.

Bad input (a size over `kafka.MAX_REQUEST_BYTES` or under a header, a body that does not decode, a frame not
complete within `frame_timeout`, a denied request whose API has no place for an error) closes the
connection; the proxy itself never stops on a connection's error. Memory per connection: one request frame,
one relayed chunk, at most `MAX_IN_FLIGHT` requests awaiting answers and `MAX_QUEUED_ANSWER_BYTES` of ours.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

from propolis.l7 import kafka
from propolis.l7.flows import kafka_flow
from propolis.l7.policy import ProxyPolicy
from propolis.l7.proxy import ConnectionDone, ProxyListeners
from propolis.l7.redirect import upstream_socket

log = logging.getLogger("propolis.l7.kafka_proxy")

RELAY_CHUNK = 65536
#: responses are streamed, never held whole; a size beyond this is no Kafka response (Fetch's max_bytes
#: defaults to 50 MiB in clients)
MAX_RESPONSE_BYTES = 1 << 30
#: requests read ahead of their answers (brokers answer one at a time; clients keep ~5 in flight): past this,
#: or past MAX_QUEUED_ANSWER_BYTES of our own queued answers, the client is not read until answers go out
MAX_IN_FLIGHT = 100
MAX_API_VERSIONS_BYTES = 65536  # an ApiVersions response is read whole to be rewritten (a few KiB in practice)
MAX_QUEUED_ANSWER_BYTES = 1024 * 1024


class KafkaProxy(ProxyListeners):
    """Serves the Kafka listeners of the node (see the module docstring)."""

    FAMILY = "kafka"
    READ_LIMIT = RELAY_CHUNK

    def __init__(self, policy: ProxyPolicy, *, node: str, make_socket: Callable[[], socket.socket],
                 on_flow: Callable[[dict[str, Any]], None] | None = None, frame_timeout: float = 10.0,
                 idle_timeout: float = 300.0, connect_timeout: float = 5.0) -> None:
        super().__init__(policy, node=node, make_socket=make_socket, on_flow=on_flow, idle_timeout=idle_timeout,
                         connect_timeout=connect_timeout)
        self.frame_timeout = frame_timeout

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str,
                     port: int) -> None:
        self.stats.connections += 1
        self.stats.active += 1
        client = writer.get_extra_info("peername")[:2]
        server = writer.get_extra_info("sockname")[:2]
        conn = _Connection(self, reader, writer, direction, port, client, server)
        try:
            await conn.run()
        except (ConnectionDone, ConnectionError, asyncio.IncompleteReadError):
            pass
        except kafka.BadFrame as exc:
            self.stats.error("bad_frame")
            log.info("Kafka connection %s:%d -> %s:%d closed: %s", *client, *server, exc)
        except Exception as exc:  # noqa: BLE001 - one connection's failure never stops the proxy
            self.stats.error(type(exc).__name__)
            log.warning("Kafka connection %s:%d -> %s:%d ended: %s: %s", *client, *server, type(exc).__name__, exc)
        finally:
            self.stats.active -= 1
            await conn.close()


class _Pending:
    """A forwarded request whose response is due from the broker (answers to denied ones queue behind it)."""

    def __init__(self, request: kafka.KafkaRequest) -> None:
        self.correlation_id, self.api_key, self.api_version = \
            request.correlation_id, request.api_key, request.api_version


class _Connection:
    def __init__(self, proxy: KafkaProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 direction: str, port: int, client: tuple[str, int], server: tuple[str, int]) -> None:
        self.proxy, self.reader, self.writer = proxy, reader, writer
        self.direction, self.port, self.client, self.server = direction, port, client, server
        self.upstream: asyncio.StreamWriter | None = None
        self.relay: asyncio.Task[None] | None = None
        #: in request order: _Pending (the broker answers) or bytes (our answer to a denied request)
        self.pending: collections.deque[_Pending | bytes] = collections.deque()
        self.queued_answer_bytes = 0
        self.answered = asyncio.Event()  # set whenever the relay took entries off `pending`

    async def close(self) -> None:
        if self.relay is not None:
            self.relay.cancel()
            await asyncio.gather(self.relay, return_exceptions=True)
        if self.upstream is not None:
            self.upstream.close()
        self.writer.close()

    async def _read_frame(self) -> bytes | None:
        """One whole request frame, None at the client's close between frames."""
        try:
            async with asyncio.timeout(self.proxy.idle_timeout):  # a timer, not wait_for's task per read
                prefix = await self.reader.readexactly(4)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise kafka.BadFrame("connection closed inside a size prefix") from None
            return None
        except TimeoutError:
            raise ConnectionDone() from None
        size = kafka.frame_size(prefix)
        try:
            async with asyncio.timeout(self.proxy.frame_timeout):
                body = await self.reader.readexactly(size)
        except TimeoutError:
            raise kafka.BadFrame(f"request of {size} bytes not complete within {self.proxy.frame_timeout}s") from None
        except asyncio.IncompleteReadError:
            raise kafka.BadFrame(f"connection closed inside a request of {size} bytes") from None
        return prefix + body

    async def run(self) -> None:
        while True:
            while len(self.pending) >= MAX_IN_FLIGHT or self.queued_answer_bytes >= MAX_QUEUED_ANSWER_BYTES:
                if self.relay is None or self.relay.done():
                    raise ConnectionDone()  # the broker's side is gone: nothing will be answered
                self.answered.clear()
                await self.answered.wait()  # back-pressure: memory per connection stays bounded
            frame = await self._read_frame()
            if frame is None:
                return
            request = kafka.parse_request(frame)
            verdict = self.proxy.policy.verdict("kafka", self.direction, self.port, self.client, self.server)
            if kafka.allowed(verdict.rules, request):
                self._flow(request, "FORWARDED", 0)
                self.proxy.stats.requests_forwarded += 1
                await self._forward(request)
            else:
                self._flow(request, "DROPPED", kafka.TOPIC_AUTHORIZATION_FAILED)
                self.proxy.stats.requests_denied += 1
                await self._deny(request)

    async def _forward(self, request: kafka.KafkaRequest) -> None:
        if self.upstream is None:
            reader, self.upstream = await self._connect()
            self.relay = asyncio.create_task(self._relay(reader), name=f"kafka-relay {self.client[0]}:{self.client[1]}")
        if request.expects_response:
            self.pending.append(_Pending(request))
        self.upstream.write(request.frame)
        await self.upstream.drain()

    async def _deny(self, request: kafka.KafkaRequest) -> None:
        if not request.expects_response:
            return
        answer = kafka.denied_response(request)
        if answer is None:
            self.proxy.stats.error("unanswerable")
            log.info("Kafka %s v%d denied and closed: its response has no place for an error",
                     request.api_key_name, request.api_version)
            raise ConnectionDone()
        if self.pending:
            self.pending.append(answer)  # after the responses the broker still owes
            self.queued_answer_bytes += len(answer)
        else:
            self.writer.write(answer)
            await self.writer.drain()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        sock = upstream_socket(self.proxy.make_socket(), self.client[0], self.direction)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, self.server), self.proxy.connect_timeout)
        except (OSError, TimeoutError):
            sock.close()
            self.proxy.stats.error("upstream_connect")
            raise ConnectionDone() from None
        return await asyncio.open_connection(sock=sock, limit=RELAY_CHUNK)

    async def _relay(self, upstream: asyncio.StreamReader) -> None:
        """Broker responses to the client, each streamed, each followed by the answers queued behind it."""
        try:
            while True:
                head = await upstream.readexactly(8)  # size, correlation id
                size, correlation_id = struct.unpack(">ii", head)
                due = self.pending[0] if self.pending else None
                if not 4 <= size <= MAX_RESPONSE_BYTES or not isinstance(due, _Pending) \
                        or due.correlation_id != correlation_id:
                    self.proxy.stats.error("upstream_bad_response")
                    break
                if due.api_key == kafka.API_KEYS["apiversions"] and size <= MAX_API_VERSIONS_BYTES:
                    await self._relay_api_versions(upstream, head, due)
                    left = 0
                elif size - 4 <= RELAY_CHUNK:  # most responses: one write (one send) for the whole frame
                    self.writer.write(head + await upstream.readexactly(size - 4))
                    left = 0
                else:
                    self.writer.write(head)
                    left = size - 4
                while left:
                    chunk = await upstream.read(min(left, RELAY_CHUNK))
                    if not chunk:
                        raise asyncio.IncompleteReadError(b"", left)
                    left -= len(chunk)
                    self.writer.write(chunk)
                    await self.writer.drain()
                self.pending.popleft()
                while self.pending and isinstance(answer := self.pending[0], bytes):
                    self.writer.write(answer)
                    self.pending.popleft()
                    self.queued_answer_bytes -= len(answer)
                await self.writer.drain()
                self.answered.set()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.answered.set()
        # the broker closed or broke the protocol: so does the client's connection
        self.writer.close()

    async def _relay_api_versions(self, upstream: asyncio.StreamReader, head: bytes, due: _Pending) -> None:
        """The broker's versions, less those whose requests name topics by id (their rules could not match)."""
        response = head[4:] + await upstream.readexactly(struct.unpack(">i", head[:4])[0] - 4)
        response = kafka.cap_api_versions(response, due.api_version) or response
        self.writer.write(struct.pack(">i", len(response)) + response)

    def _flow(self, request: kafka.KafkaRequest, verdict: str, error_code: int) -> None:
        if self.proxy.on_flow is None:
            return
        policy = self.proxy.policy
        self.proxy.on_flow(kafka_flow(node=self.proxy.node, direction=self.direction, client=self.client,
                                      server=self.server, client_identity=policy.identity_of(self.client[0]),
                                      server_identity=policy.identity_of(self.server[0]), request=request,
                                      verdict=verdict, error_code=error_code))
